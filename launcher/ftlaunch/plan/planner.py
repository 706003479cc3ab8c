"""The plan: how to train this model on this hardware, and whether it fits.

`plan(Hardware, ModelSpec, TrainSpec) -> Plan` is pure: no I/O, no torch.
It walks the strategies from cheapest to most elaborate and takes the first
that fits the per-device memory budget:

    1 GPU:     LoRA (bf16) -> QLoRA
    n GPUs:    DDP LoRA -> FSDP QLoRA (or DeepSpeed ZeRO-3) -> the same with CPU offload
    no GPU:    engine "cpu", N worker processes (gloo); --engine fsdp / deepspeed
               run those engines on the N CPU processes instead (to try a plan's
               path on a laptop, and so tests run the real thing)

For each it lowers the micro-batch, then turns gradient checkpointing on and
lowers it again (on one GPU, QLoRA without checkpointing is tried before LoRA
with it: see `_stages`), and fills the requested global batch with gradient
accumulation. Memory terms live in `memory.py`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ftlaunch.plan import batch, memory, objectives, recipe
from ftlaunch.detect.hardware import Hardware
from ftlaunch.units import format_gib
from ftlaunch.models.presets import ModelSpec, lora_parameter_count

ENGINES = ("auto", "single", "ddp", "fsdp", "deepspeed", "cpu")


@dataclass(frozen=True)
class TrainSpec:
    seq_len: int = recipe.DEFAULT_SEQ_LEN
    global_batch_size: int = recipe.DEFAULT_GLOBAL_BATCH
    method: str = "auto"  # auto | lora | qlora
    engine: str = "auto"  # auto | ddp | fsdp | deepspeed
    processes_per_node: int | None = None  # --gpus N; None: every GPU (or 1 CPU process)
    lora_rank: int = recipe.LORA_DEFAULTS["r"]
    lora_targets: tuple[str, ...] | str = "all-linear"
    lora_dropout: float = recipe.LORA_DEFAULTS["lora_dropout"]
    # None: the plan decides (off while the batch fits without it); True/False: the user's.
    gradient_checkpointing: bool | None = None
    # TRL computes the whole logits (not its fused LM head) for label smoothing.
    full_logits: bool = False
    objective: str = "sft"  # plan.objectives: sft | dpo | kto
    # A reference model's forward passes in every step (DPO, KTO; unless precomputed).
    reference_forward: bool = False
    reference_adapter: bool = False  # from --adapter: a frozen copy of it is the reference

    @property
    def sequences_per_example(self) -> int:  # sequences per example: DPO's pair is two
        return objectives.get(self.objective).sequences_per_example

    @property
    def least_micro_batch(self) -> int:  # KTO: two, for its KL estimate
        return objectives.get(self.objective).least_micro_batch


@dataclass(frozen=True)
class Candidate:
    method: str
    engine: str
    zero_stage: int | None = None
    offload: bool = False


@dataclass(frozen=True)
class Plan:
    model_id: str
    parameters: int
    trainable_parameters: int
    hardware: Hardware
    method: str
    engine: str
    zero_stage: int | None
    offload: bool
    processes_per_node: int  # what --gpus became: GPUs (or CPU processes) on each node
    per_device_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    precision: str  # bf16 | fp16 | fp32
    memory: memory.Breakdown
    budget_bytes: int
    reasons: tuple[str, ...] = field(default=())
    # The recipe's global batch when it did not divide over the processes and this plan's
    # is the nearest multiple below it (None: as asked). Not in to_json: the batch itself is.
    batch_adjusted_from: int | None = None
    objective: str = "sft"  # plan.objectives
    reference_forward: bool = False  # DPO, KTO: a reference's forward passes in every step

    @property
    def sequences_per_example(self) -> int:  # rows per example: DPO's pair is two
        return objectives.get(self.objective).sequences_per_example

    @property
    def batch_note(self) -> str | None:
        return batch.note(self)

    @property
    def num_machines(self) -> int:
        return self.hardware.nodes

    @property
    def num_processes(self) -> int:
        """The world size: every node's processes."""
        return self.processes_per_node * self.num_machines

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.budget_bytes

    @property
    def strategy(self) -> Candidate:
        return Candidate(self.method, self.engine, self.zero_stage, self.offload)

    @property
    def on_cpu(self) -> bool:
        """The workers run on CPU (engine "cpu", or any engine on a machine without GPUs)."""
        return not self.hardware.has_gpus

    def to_json(self) -> dict:
        """The plan JSON contract (DESIGN.md section 5)."""
        hw = self.hardware
        return {
            "model": {"id": self.model_id, "parameters": self.parameters,
                      "trainable_parameters": self.trainable_parameters},
            "hardware": {"nodes": hw.nodes, "gpus_per_node": hw.gpus_per_node,
                         "gpu_name": hw.gpu.name if hw.gpu else None,
                         "gpu_memory_bytes": hw.gpu.memory_bytes if hw.gpu else 0},
            "objective": self.objective,
            "reference_forward": self.reference_forward,
            "method": self.method,
            "engine": self.engine,
            "zero_stage": self.zero_stage,
            "offload": self.offload,
            "num_processes": self.num_processes,
            "num_machines": self.num_machines,
            "per_device_batch_size": self.per_device_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "global_batch_size": self.global_batch_size,
            "seq_len": self.seq_len,
            "gradient_checkpointing": self.gradient_checkpointing,
            "precision": self.precision,
            "memory": {"per_device_peak_bytes": self.memory.total,
                       "budget_bytes": self.budget_bytes, **asdict(self.memory)},
            "fits": self.fits,
            "reasons": list(self.reasons),
        }


def plan(hardware: Hardware, model: ModelSpec, spec: TrainSpec, _hints: bool = True) -> Plan:
    processes_per_node = _processes_per_node(hardware, spec)
    world = processes_per_node * hardware.nodes
    budget = _budget(hardware, processes_per_node)
    reasons: list[str] = []
    last: Plan | None = None
    failed: dict[Candidate, Plan] = {}
    for candidate, checkpointing in _stages(hardware, spec, world):
        for micro in batch.micro_batches(spec.global_batch_size, world, spec.least_micro_batch):
            mem = memory.estimate(model, spec, candidate, micro, world,
                                  on_gpu=hardware.has_gpus, gradient_checkpointing=checkpointing)
            last = _make_plan(hardware, model, spec, candidate, micro, processes_per_node, mem,
                              budget, checkpointing)
            if last.fits:
                reasons.append(_why(candidate, hardware, world))
                reasons.extend(_rejections(failed, last, budget))
                reasons.extend([last.batch_note] if last.batch_note else [])
                return replace(last, reasons=tuple(reasons))
        failed[candidate] = last
    assert last is not None
    rejected = _rejections(failed, None, budget)
    hints = _what_would_fit(hardware, model, spec) if _hints else []
    return replace(last, reasons=tuple(rejected + hints))


def _processes_per_node(hardware: Hardware, spec: TrainSpec) -> int:
    if spec.processes_per_node is not None:
        return spec.processes_per_node
    return hardware.gpus_per_node if hardware.has_gpus else 1


def _budget(hardware: Hardware, processes_per_node: int) -> int:
    """Usable bytes per device.

    GPU: the card's memory less 8 % for allocator fragmentation and the
    caching allocator's rounding (PyTorch CUDA memory notes), so "fits" means
    fits at peak, not on average. CPU: 80 % of RAM shared by the workers.
    """
    if hardware.has_gpus:
        return int(hardware.gpu.memory_bytes * 0.92)
    return int(hardware.ram_bytes * 0.8 / max(processes_per_node, 1))


def _candidates(hardware: Hardware, spec: TrainSpec, world: int) -> list[Candidate]:
    """Strategies from cheapest to most elaborate.

    One device: LoRA on a 16-bit base, else QLoRA. Several GPUs: DDP while a whole
    replica fits on each (no weight traffic, only LoRA gradients are all-reduced),
    else shard the 4-bit base (FSDP-QLoRA, or ZeRO-3 with --engine deepspeed),
    then the same with parameters and optimizer state offloaded to CPU RAM.
    """
    methods = [m for m in ("lora", "qlora") if spec.method in ("auto", m)]
    if not hardware.has_gpus:
        # Asked for by name, a sharded engine runs on the CPU processes as it would on
        # GPUs (the automatic choice stays DDP over gloo: sharding saves no RAM worth
        # the all-gathers there).
        if spec.engine in ("fsdp", "deepspeed"):
            return [Candidate(methods[0], spec.engine, 3 if spec.engine == "deepspeed" else None)]
        return [Candidate(methods[0], "cpu")]
    if world == 1 and spec.engine in ("fsdp", "deepspeed"):
        # Asked for on one device: nothing to shard, but the engine's checkpoints, so a run
        # sharded over N processes can go on with one and back (see run.resume_rules).
        return [Candidate(m, spec.engine, 3 if spec.engine == "deepspeed" else None)
                for m in methods]
    if world == 1:
        return [Candidate(m, "single") for m in methods]
    # With --method auto, sharding is for QLoRA: a sharded 16-bit base moves 4x the bytes.
    sharded_method = "lora" if spec.method == "lora" else "qlora"
    engine = "deepspeed" if spec.engine == "deepspeed" else "fsdp"
    zero = 3 if engine == "deepspeed" else None
    out: list[Candidate] = []
    if spec.engine in ("auto", "ddp"):
        if "lora" in methods:
            out.append(Candidate("lora", "ddp"))
        if spec.method == "qlora" or ("qlora" in methods and spec.engine == "ddp"):
            out.append(Candidate("qlora", "ddp"))
    if spec.engine != "ddp":
        out.append(Candidate(sharded_method, engine, zero))
        out.append(Candidate(sharded_method, engine, zero, offload=True))
    return out


def _stages(hardware: Hardware, spec: TrainSpec, world: int) -> list[tuple[Candidate, bool]]:
    """(strategy, gradient checkpointing) in the order worth trying.

    Within a stage the micro-batch comes down first: a smaller micro-batch with
    more accumulation costs little throughput, while checkpointing costs about a
    third more compute (one extra forward per layer). So each strategy is tried
    without checkpointing before with it.

    One GPU with --method auto is the exception: QLoRA without checkpointing comes
    before bf16 LoRA with it. A 16-bit base that fits only with checkpointing leaves
    no room for the batch (8B on 24 GB: 15 GiB of weights); the 4-bit base frees
    ~10 GiB for it, its dequantisation costs about what checkpointing does, and
    QLoRA matches 16-bit LoRA's quality (Dettmers et al. 2023, tables 3-4).
    """
    candidates = _candidates(hardware, spec, world)
    if spec.gradient_checkpointing is not None:  # asked for: only that
        return [(c, spec.gradient_checkpointing) for c in candidates]
    if world == 1 and hardware.has_gpus and spec.method == "auto":
        return [(c, False) for c in candidates] + [(c, True) for c in candidates]
    return [(c, gc) for c in candidates for gc in (False, True)]


def _rejections(failed: dict[Candidate, Plan], chosen: Plan | None, budget: int) -> list[str]:
    out = []
    for candidate, attempt in failed.items():
        if chosen is not None and candidate == chosen.strategy:
            continue  # it fitted with checkpointing, after failing without
        note = "" if attempt.gradient_checkpointing else " without gradient checkpointing"
        line = (f"rejected {_label(candidate)}: needs {format_gib(attempt.memory.total, 1)} per "
                f"device{note} even at micro-batch {attempt.per_device_batch_size}, budget "
                f"{format_gib(budget, 1)}")
        if (chosen is not None and not attempt.gradient_checkpointing
                and not chosen.gradient_checkpointing):
            line += (f"; {_label(chosen.strategy)} without checkpointing is preferred to checkpointing "
                     "a 16-bit base")
        out.append(line)
    return out


def _make_plan(hardware, model, spec, candidate, micro, processes_per_node, mem, budget,
               checkpointing) -> Plan:
    world = processes_per_node * hardware.nodes
    accumulation = max(spec.global_batch_size // (micro * world), 1)
    precision = "fp32" if not hardware.has_gpus else ("bf16" if hardware.gpu.bf16 else "fp16")
    return Plan(
        model_id=model.name,
        parameters=model.parameters,
        trainable_parameters=lora_parameter_count(model, spec.lora_rank, spec.lora_targets),
        hardware=hardware,
        method=candidate.method,
        engine=candidate.engine,
        zero_stage=candidate.zero_stage,
        offload=candidate.offload,
        processes_per_node=processes_per_node,
        per_device_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        global_batch_size=micro * accumulation * world,
        seq_len=spec.seq_len,
        gradient_checkpointing=checkpointing,
        precision=precision,
        memory=mem,
        budget_bytes=budget,
        batch_adjusted_from=(spec.global_batch_size
                             if micro * accumulation * world != spec.global_batch_size else None),
        objective=spec.objective,
        reference_forward=spec.reference_forward,
    )


def _label(c: Candidate) -> str:
    engine = f"DeepSpeed ZeRO-{c.zero_stage}" if c.engine == "deepspeed" else c.engine.upper()
    return f"{engine} {c.method.upper()}" + (" with CPU offload" if c.offload else "")


def _why(c: Candidate, hardware: Hardware, world: int) -> str:
    if c.engine == "cpu":
        return (f"no GPU found: training on CPU with {world} worker process"
                f"{'es (gloo DDP)' if world > 1 else ''}")
    if not hardware.has_gpus:
        where = f"{world} CPU worker processes (gloo)" if world > 1 else "one CPU process"
        return f"no GPU found: {_label(c)} on {where}, as asked"
    if world == 1 and c.engine in ("fsdp", "deepspeed"):
        return (f"one GPU: {_label(c)} as asked (nothing to shard; its checkpoints carry on "
                "over another process count)")
    if c.engine == "single":
        return f"one GPU: {_label(c)} is the cheapest strategy that fits"
    if c.engine == "ddp":
        return f"{world} GPUs and a full replica fits on each: {_label(c)} (fastest multi-GPU)"
    return f"{world} GPUs, no replica fits on one: sharding with {_label(c)}"


def peak_at_row_length(plan: Plan, model: ModelSpec, spec: TrainSpec, tokens: int) -> int:
    """The plan's per-device peak if every row held `tokens` tokens: unpacked data is
    padded to each batch's longest example, not to seq_len, so a plan for full rows is
    only a bound there (the demo: 53-token examples, seq_len 128)."""
    return memory.estimate(model, replace(spec, seq_len=tokens), plan.strategy,
                           plan.per_device_batch_size, plan.num_processes,
                           on_gpu=plan.hardware.has_gpus,
                           gradient_checkpointing=plan.gradient_checkpointing).total


def _what_would_fit(hardware: Hardware, model: ModelSpec, spec: TrainSpec) -> list[str]:
    """Suggestions that are themselves plans that fit, so following one works."""
    hints = []
    tries = []
    if spec.engine == "ddp" and hardware.has_gpus:
        tries.append(("--engine fsdp (shard the base, offload if needed)",
                      replace(spec, engine="fsdp")))
    if spec.method != "qlora":
        tries.append(("--method qlora", replace(spec, method="qlora")))
    seq = spec.seq_len // 2
    while seq >= 256:
        tries.append((f"--method qlora --seq-len {seq}", replace(spec, method="qlora", seq_len=seq)))
        seq //= 2
    for flags, trial in tries:
        alternative = plan(hardware, model, trial, _hints=False)
        if alternative.fits:
            hints.append(f"would fit: {flags}: {_label(alternative.strategy)}")
            break
    if hardware.has_gpus:
        for gpus in (2, 4, 8):
            if gpus <= hardware.gpus_per_node:
                continue
            more = replace(hardware, gpus_per_node=gpus)
            if plan(more, model, replace(spec, processes_per_node=None), _hints=False).fits:
                hints.append(f"would fit: {gpus} GPUs per node like these (--gpus {gpus})")
                break
        else:
            for nodes in (2, 4, 8):
                more = replace(hardware, nodes=hardware.nodes * nodes, gpus_per_node=8)
                if plan(more, model, replace(spec, processes_per_node=None), _hints=False).fits:
                    hints.append(f"would fit: {more.nodes} nodes of 8 such GPUs")
                    break
    return hints or ["nothing smaller fits either: use a smaller model or GPUs with more memory"]
