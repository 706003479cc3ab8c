"""Plans and hardware as text for people (the JSON forms live with the dataclasses)."""

from __future__ import annotations

from dataclasses import fields

from ftlaunch.plan import estimate, objectives
from ftlaunch.detect.hardware import Hardware
from ftlaunch.units import GIB, count, duration, format_gib
from ftlaunch.plan.planner import Plan


def summary_lines(plan: Plan) -> list[str]:
    """Model, hardware, strategy and batch: the head of every plan table."""
    hw = plan.hardware
    strategy = f"{plan.method.upper()} on {plan.engine}"
    if plan.zero_stage:
        strategy += f" (ZeRO-{plan.zero_stage})"
    if plan.offload:
        strategy += " with CPU offload"
    lines = [
        f"model      {plan.model_id}: {plan.parameters:,} parameters, "
        f"{plan.trainable_parameters:,} trainable (LoRA)",
        f"hardware   {hw.describe()}" + ("" if hw.source == "detected" else f"  [described: {hw.source}]"),
        f"strategy   {strategy}, {plan.num_processes} process(es) on {plan.num_machines} machine(s), "
        f"{plan.precision}",
        f"batch      global {plan.global_batch_size} = micro-batch {plan.per_device_batch_size} x "
        f"accumulation {plan.gradient_accumulation_steps} x {plan.num_processes} process(es); "
        f"seq len {plan.seq_len}; gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}",
    ]
    objective = objectives.get(plan.objective)
    if objective.has_reference:
        passes = ("a reference forward pass per step" if objective.reference_forwards == 1
                  else "the reference's forward passes on both per step")
        reference = (f"{passes} (no gradients)" if plan.reference_forward
                     else "reference log-probs computed once before training")
        lines.append(f"objective  {plan.objective.upper()} on {objective.data}: "
                     f"{objective.in_batch}; {reference}")
    if plan.batch_note:  # never silent: the launch table shows this, not only `ftlaunch plan`
        lines.append(f"           note: {plan.batch_note}")
    return lines


def plan_text(plan: Plan) -> str:
    lines = [*summary_lines(plan), "", "memory per device (peak estimate)"]
    for f in fields(plan.memory):
        if f.name == "cuda_context":
            continue  # shown inside overhead
        note = (f"  (incl. CUDA context {format_gib(plan.memory.cuda_context, 2)})"
                if f.name == "overhead" and plan.memory.cuda_context else "")
        lines.append(f"  {f.name:<12} {format_gib(getattr(plan.memory, f.name), 2):>10}{note}")
    headroom = plan.budget_bytes - plan.memory.total
    lines += [
        f"  {'total':<12} {format_gib(plan.memory.total, 2):>10}",
        f"  {'budget':<12} {format_gib(plan.budget_bytes, 2):>10}",
        f"  {'headroom':<12} {format_gib(headroom, 2):>10}",
        "",
        *memory_bars(plan),
        "",
        "fits" if plan.fits else "DOES NOT FIT",
    ]
    lines += [f"  - {reason}" for reason in plan.reasons if reason != plan.batch_note]
    return "\n".join(lines)


# One letter per memory term in the bars; what is left of the budget is '.'.
_BAR_TERMS = (("W", "weights", ("weights",)),
              ("A", "adapter+gradients+optimizer", ("adapter", "gradients", "optimizer")),
              ("X", "activations+logits", ("activations", "logits")),
              ("O", "overhead", ("overhead",)))
BAR_WIDTH = 40
_MAX_BARS = 8


def memory_bars(plan: Plan) -> list[str]:
    """A bar per device of this node: the planned peak by term against the budget (the
    card less the allocator's margin), then the legend. Every device of a plan carries
    the same load."""
    mem, budget = plan.memory, plan.budget_bytes
    cell = max(budget, mem.total) / BAR_WIDTH
    bar, used = "", 0
    for letter, _, names in _BAR_TERMS:
        part = sum(getattr(mem, n) for n in names)
        bar, used = bar + letter * (round((used + part) / cell) - round(used / cell)), used + part
    edge = round(budget / cell)
    bar += "." * (edge - len(bar))  # the free part of the budget; none when it does not fit
    if mem.total > budget:
        bar = bar[:edge] + "!" + bar[edge + 1:]  # where the budget ends
    label = "gpu" if plan.hardware.has_gpus else "cpu worker"
    devices = plan.processes_per_node
    rows = [f"  {label} {i:<3} [{bar}] {mem.total / GIB:6.2f} / {format_gib(budget, 2)}"
            for i in range(min(devices, _MAX_BARS))]
    if devices > _MAX_BARS:
        rows.append(f"  ... {devices - _MAX_BARS} more, the same")
    legend = ", ".join(f"{letter} {what}" for letter, what, _ in _BAR_TERMS)
    return [*rows, f"  ({legend}, . free" + (", ! budget" if mem.total > budget else "") + ")"]


def run_text(plan: Plan, model, size, data_note: str = "", measured=None,
             done_steps: int = 0) -> list[str]:
    """The run's size and its time: from a measured rate of this plan (ftlaunch.launch.throughput)
    where one was kept, else, on known GPUs, the FLOPs estimate (ftlaunch.plan.estimate)."""
    steps = f"{size.steps} steps" if size.steps else "steps: set by the epochs"
    lines = [f"run        {steps} x {count(size.tokens_per_step)} tokens"
             + (f" = {count(size.tokens)} tokens" if size.tokens else "") + data_note]
    left = ""
    tokens = size.tokens
    if size.steps and 0 < done_steps < size.steps:
        tokens = (size.steps - done_steps) * size.tokens_per_step
        left = f" for the {size.steps - done_steps} steps left"
    if tokens and measured is not None:
        seconds = tokens / measured.tokens_per_s
        lines.append(f"time       ~{duration(seconds)}{left} ({measured.source()})")
        return lines
    seconds = estimate.gpu_seconds(model, plan, tokens) if tokens else None
    if seconds is not None:
        lines.append(f"time       ~{duration(seconds)}{left} (estimate: FLOPs at "
                     f"{estimate.MFU[plan.method]:.0%} of the GPU's 16-bit peak; the progress line "
                     "shows the measured rate)")
    else:
        lines.append("time       measured once training runs: the progress line shows the ETA")
    return lines


def hardware_text(hw: Hardware) -> str:
    lines = [hw.describe()]
    if hw.gpu is not None:
        cap = hw.gpu.compute_capability
        lines.append(f"  gpu: {hw.gpu.name}, {format_gib(hw.gpu.memory_bytes, 2)}, compute capability "
                     f"{f'{cap[0]}.{cap[1]}' if cap else 'unknown'}, bf16 {'yes' if hw.gpu.bf16 else 'no'}")
    lines.append(f"  cpu cores: {hw.cpu_cores}   ram: {format_gib(hw.ram_bytes, 2)}")
    if hw.disk_free_bytes is not None:
        lines.append(f"  free disk (output dir): {format_gib(hw.disk_free_bytes, 2)}")
    return "\n".join(lines)
