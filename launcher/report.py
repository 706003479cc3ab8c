"""Plans and hardware as text for people (the JSON forms live with the dataclasses)."""

from __future__ import annotations

from dataclasses import fields

from ftlaunch.hardware import Hardware, format_gib
from ftlaunch.planner import Plan


def plan_text(plan: Plan) -> str:
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
        "",
        "memory per device (peak estimate)",
    ]
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
        "fits" if plan.fits else "DOES NOT FIT",
    ]
    lines += [f"  - {reason}" for reason in plan.reasons]
    return "\n".join(lines)


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
