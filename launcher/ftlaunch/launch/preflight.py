"""Preflight: the disk and host RAM a run will need, checked before any worker starts.

A run that dies of a full disk at its third checkpoint, or of the OOM killer while
eight processes each load a 16 GB base, has wasted the queue time and the steps
since the last checkpoint. Both are predictable from the plan, so the launcher
compares them with what this machine has now and refuses (UserError, exit 2)
while nothing has started yet.

What a checkpoint holds (measured on real checkpoints of the tiny model,
tests/test_preflight.py; T trainable LoRA parameters, W processes):

  every engine   adapter_model.safetensors: T x 4 bytes (PEFT keeps LoRA weights
                 fp32 next to a 16-bit base, autocast_adapter_dtype; DeepSpeed
                 with bf16/fp16 casts them to 16 bits, so 4 is the upper bound);
                 the tokenizer files; rng_state_<rank>.pth per process (~14 KiB);
                 scheduler.pt, trainer_state.json, training_args.bin, model
                 card, adapter config, ftlaunch's marker (~20 KiB together)
  single/ddp/cpu optimizer.pt: AdamW's two fp32 moments, T x 8 bytes
  deepspeed      global_stepN/: one optimizer shard per rank holding its part of
                 the fp32 master weights and both moments (T x 12 bytes in all);
                 ZeRO-2: mp_rank_00_model_states.pt (rank 0) with the trainable
                 weights and, because PEFT's checkpoints exclude frozen weights
                 by named_parameters(), which lists a tied weight once, the tied
                 lm_head whole (vocab x hidden in the compute dtype); no other
                 frozen base weight. ZeRO-3: a model-states file per rank with
                 empty placeholders (~1 KiB per tensor), no base weights.
                 Also zero_to_fp32.py and zero_to_torch.py (~40 KiB).
  fsdp           (read from accelerate's save_fsdp_model/save_fsdp_optimizer with
                 the Trainer's adapter_only=True, not measured: FSDP needs a GPU)
                 pytorch_model_fsdp_0/ with the adapter's shards (T x 4) and
                 optimizer_0/ with the moments' shards (T x 8), each with a
                 torch.distributed.checkpoint index; no base weights, and no
                 adapter_model.safetensors (save_model writes one only for
                 FULL_STATE_DICT).

The runtime's versions for run.yaml and the `--report-to` check are in detect/runtime.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import psutil

from ftlaunch.errors import UserError
from ftlaunch.detect.hardware import free_disk
from ftlaunch.plan.memory import weights_bytes
from ftlaunch.models.presets import ModelSpec, cached_hub_config
from ftlaunch.plan.planner import Plan
from ftlaunch.units import GIB, KIB, MIB, human_size

# --- checkpoint sizes -------------------------------------------------------------------

# Per-file and per-tensor figures, rounded up from the tiny model's checkpoints
# (torch 2.13, transformers 5.23, PEFT 0.21, DeepSpeed 0.19).
_SMALL_FILES = 24 * KIB  # model card, adapter config, scheduler, trainer state, args, marker
_RNG_PER_RANK = 16 * KIB  # torch + numpy + python RNG states (14.1 KiB measured)
_SAFETENSORS_PER_TENSOR = 128  # header entry (126 B measured)
_PICKLE_PER_TENSOR = KIB  # optimizer.pt / model-states entries (840-1020 B measured)
_DS_SHARD_FILE = 8 * KIB  # a ZeRO optimizer shard beyond its tensors (5.5 KiB measured)
_DS_SCRIPTS = 48 * KIB  # zero_to_fp32.py, zero_to_torch.py, latest
# Tokenizer files when they cannot be measured, generously: llama-3's tokenizer.json is
# about 9 MB for 128k entries (~70 B each), the tiny model's 22 KB for 512.
_TOKENIZER_PER_VOCAB_ENTRY = 160

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                    "vocab.txt", "spiece.model", "chat_template.jinja", "chat_template.json")

# Whatever else the run directory collects (train.log, metrics.jsonl, loss.png, the
# trainer state's log history growing with the steps) and estimation error.
_DISK_MARGIN_FRACTION = 0.10
_DISK_MARGIN_BYTES = 64 * MIB


def tokenizer_bytes(location: str | Path) -> int | None:
    """Bytes of the tokenizer files that every checkpoint and the adapter copy, read from
    a local model folder or a hub id's snapshot in the Hugging Face cache; None when
    neither is here (the caller's estimate falls back to the vocabulary size)."""
    folder = Path(location).expanduser()
    if not folder.is_dir():
        config = cached_hub_config(str(location))
        if config is None:
            return None
        folder = config.parent
    # stat() follows the hub cache's symlinks to the blobs.
    total = sum(p.stat().st_size for p in (folder / n for n in _TOKENIZER_FILES) if p.is_file())
    return total or None  # a snapshot with only config.json cached: no files to measure


def _lora_tensors(model: ModelSpec) -> int:
    """A and B for every linear layer of every decoder layer: "all-linear", the most
    LoRA can target, so the per-tensor overheads are an upper bound."""
    return 2 * model.num_layers * len(model.linear_shapes())


def _adapter_file_bytes(plan: Plan, model: ModelSpec) -> int:
    return 4 * plan.trainable_parameters + _SAFETENSORS_PER_TENSOR * _lora_tensors(model)


def _tokenizer_or_guess(model: ModelSpec, tokenizer: int | None) -> int:
    return _TOKENIZER_PER_VOCAB_ENTRY * model.vocab_size if tokenizer is None else tokenizer


def checkpoint_bytes(plan: Plan, model: ModelSpec, tokenizer: int | None = None) -> int:
    """Bytes of ONE checkpoint of this plan, all ranks' files together (module docstring).

    `tokenizer`: bytes of the tokenizer files (`tokenizer_bytes`); None estimates them
    from the vocabulary size, generously."""
    trainable, world = plan.trainable_parameters, plan.num_processes
    tensors = _lora_tensors(model)
    total = _tokenizer_or_guess(model, tokenizer) + _SMALL_FILES + _RNG_PER_RANK * world
    if plan.engine != "fsdp":
        total += _adapter_file_bytes(plan, model)
    if plan.engine == "deepspeed":
        total += 12 * trainable + _DS_SHARD_FILE * world + _DS_SCRIPTS
        if plan.zero_stage == 3:
            total += _PICKLE_PER_TENSOR * tensors * world
            if plan.method == "qlora":  # every rank's model-state file holds all of it
                total += world * _quant_state_bytes(model)
        else:
            total += 4 * trainable + _PICKLE_PER_TENSOR * tensors
            if model.tie_word_embeddings:
                compute = 4 if plan.precision == "fp32" else 2
                total += model.vocab_size * model.hidden_size * compute
    elif plan.engine == "fsdp":
        # Adapter and moment shards, and a DCP index entry per tensor, state and rank.
        total += 12 * trainable + 3 * _PICKLE_PER_TENSOR * tensors * world
    else:
        total += 8 * trainable + _PICKLE_PER_TENSOR * tensors
    return total


def _quant_state_bytes(model: ModelSpec) -> int:
    """bitsandbytes' quant state of every 4-bit linear layer (ZeRO-3 saves it beside the
    empty partitioned weights): absmax, a byte per 64-weight block (double quant), the
    nested absmax (fp32 per 256 blocks), the two quant maps (16 and 256 fp32) and the
    state's packed record (~170 bytes); five pickled tensors per layer."""
    shapes = model.linear_shapes().values()
    weights = model.num_layers * sum(i * o for i, o in shapes)
    linears = model.num_layers * len(shapes)
    return (weights // 64 + 4 * weights // (64 * 256)
            + linears * (4 * (16 + 256) + 170 + 5 * _PICKLE_PER_TENSOR))


def checkpoints_at_once(keep: int | None, saves: int | None, existing: int = 0) -> int | None:
    """New checkpoints on disk at the same time from now on: `keep` (save_total_limit;
    None keeps all) plus the one being written, since retention deletes the oldest only
    after the newer one is complete; never more than the `saves` still to come (None:
    not known ahead). `existing` complete ones already there count toward `keep` and
    already take their space. None when keep is None and the saves are not known."""
    if keep is None:
        return saves
    bound = max(keep - existing, 0) + 1
    return bound if saves is None else min(saves, bound)


def saves_ahead(max_steps: int | None, save_steps: float | None,
                from_step: int = 0) -> int | None:
    """Checkpoints save_steps will write after `from_step`: the last step writes none
    (adapter/ is written instead; see worker.checkpointing.Checkpointing). A save_steps below 1 is a
    fraction of max_steps, as the Trainer reads it. None with no step limit (epochs) or
    no step interval."""
    if not max_steps or max_steps < 1 or not save_steps or save_steps <= 0:
        return None
    every = math.ceil(max_steps * save_steps) if save_steps < 1 else int(save_steps)
    return max((max_steps - 1) // every - from_step // every, 0)


def disk_needed(plan: Plan, model: ModelSpec, keep: int | None, extra_bytes: int = 0, *,
                max_steps: int | None = None, save_steps: float | None = None,
                from_step: int = 0, existing: int = 0,
                tokenizer: int | None = None) -> tuple[int, str]:
    """(bytes the run directory's filesystem needs from now on, how they add up).

    Checkpoints on disk at once (`checkpoints_at_once`) + the final adapter + extra_bytes
    (what else will be written there, e.g. the tokenized data cache) + a margin. Pass
    save_steps=None when --save-every adds checkpoints at times nobody can count ahead.
    `from_step`/`existing`: a resume's step and its complete checkpoints."""
    tokenizer = _tokenizer_or_guess(model, tokenizer)
    one = checkpoint_bytes(plan, model, tokenizer)
    saves = saves_ahead(max_steps, save_steps, from_step)
    count = checkpoints_at_once(keep, saves, existing)
    parts = []
    if count is None:
        count = 1
        parts.append(f"at least 1 checkpoint of {human_size(one)} (save_total_limit: null keeps "
                     "every checkpoint, and how many there will be is not known ahead: each "
                     f"one needs {human_size(one)} more)")
    else:
        if keep is None:
            why = "save_total_limit: null keeps every one"
        elif saves is not None and count == saves:
            why = f"only {saves} save{'s' if saves != 1 else ''} ahead"
        else:
            why = f"save_total_limit {keep}, plus the one being written before the oldest goes"
            if existing:
                why += f"; {existing} already there"
        parts.append(f"{count} new checkpoint{'s' if count != 1 else ''} of {human_size(one)} "
                     f"({why})")
    adapter = _adapter_file_bytes(plan, model) + tokenizer + 8 * KIB  # + config, model card
    parts.append(f"the final adapter, {human_size(adapter)}")
    if extra_bytes:
        parts.append(f"{human_size(extra_bytes)} more (data cache)")
    subtotal = count * one + adapter + extra_bytes
    margin = int(subtotal * _DISK_MARGIN_FRACTION) + _DISK_MARGIN_BYTES
    parts.append(f"{human_size(margin)} margin for logs and estimation error")
    return subtotal + margin, " + ".join(parts)


def check_disk(path: Path, needed: int, breakdown: str) -> None:
    """UserError when the filesystem of `path` has less free space than `needed`."""
    probe, free = free_disk(path)
    if free >= needed:
        return
    raise UserError(
        f"Not enough free disk for this run: {path} needs about {human_size(needed)} ({breakdown}), "
        f"but its filesystem ({probe}) has {human_size(free)} free. Keep fewer checkpoints (--set "
        "save_total_limit=1 keeps one, plus the next while it is written), save less often "
        "(--set save_steps=N), put the run on a larger filesystem with another --output-dir, "
        "or free space there.")


# --- host RAM ----------------------------------------------------------------------------

# A GPU worker's own resident memory: torch with the CUDA, cuBLAS and NCCL libraries
# loaded, transformers/TRL/datasets imported, the tokenized data, pinned staging buffers.
_GPU_WORKER_BYTES = 2 * GIB
# What a CPU worker holds beyond the planner's figure for it: the tiny model's worker
# peaked at 0.56 GiB resident, mostly the libraries, where the planner counts 0.5 GiB.
_CPU_WORKER_EXTRA = 512 * MIB
# accelerate launch and torchrun's agent, one per node.
_LAUNCHER_BYTES = 512 * MIB


def ram_needed(plan: Plan, model: ModelSpec) -> tuple[int, str]:
    """(host RAM one node needs at the peak of loading and training, how it adds up).

    Conservative on purpose; each engine loads differently:
      cpu                every process trains in RAM: the plan's per-process estimate.
      single, ddp,       from_pretrained without a device_map builds the model on the
      ZeRO-2 (LoRA)      CPU and the Trainer then moves it to the GPU, so every process
                         holds a whole 16-bit copy for a while.
      QLoRA, same        bitsandbytes sets device_map to the process's GPU and quantises
                         while loading: only one layer or the embedding passes through RAM.
      fsdp, ZeRO-3       cpu_ram_efficient_loading / zero.Init: one process per node
                         reads the weights (as they will be trained: NF4 for QLoRA), the
                         others receive their shards.
      + offload          FSDP's offload_params / ZeRO-3's offload_param and
                         offload_optimizer keep this node's share of the base and of the
                         adapter's weights, gradients, master copy and moments in RAM.
    """
    per_node = plan.processes_per_node
    parts = []
    if plan.on_cpu:
        worker = plan.memory.total + _CPU_WORKER_EXTRA
        if plan.engine == "fsdp" and per_node > 1:
            # Every CPU rank loads the whole base before FSDP shards it (no broadcast from
            # rank 0 on CPU: render.py), so loading may outgrow a sharded rank's step.
            whole = weights_bytes(model, plan.method, on_gpu=False, shards=1, offload=False)
            worker = max(worker, whole + _CPU_WORKER_EXTRA)
        parts.append(f"{per_node} CPU worker{'s' if per_node > 1 else ''} x {human_size(worker)} "
                     "(weights, optimizer, activations, libraries)")
        total = per_node * worker
    else:
        total = per_node * _GPU_WORKER_BYTES
        parts.append(f"{per_node} GPU worker process{'es' if per_node > 1 else ''} x "
                     f"{human_size(_GPU_WORKER_BYTES)}")
        # The base as it will be trained (NF4 for QLoRA), whole.
        base = weights_bytes(model, plan.method, on_gpu=True, shards=1, offload=False)
        if plan.engine == "fsdp" or (plan.engine == "deepspeed" and plan.zero_stage == 3):
            loaded = base
            total += loaded
            parts.append(f"one process loads the base ({human_size(loaded)})")
        elif plan.method == "qlora":
            staging = 2 * max(model.embedding_parameters(),
                              sum(i * o for i, o in model.linear_shapes().values()))
            total += per_node * staging
            parts.append(f"{per_node} x {human_size(staging)} passing through while quantising")
        else:
            dense = 2 * model.parameters
            total += per_node * dense
            parts.append(f"{per_node} whole 16-bit cop{'ies' if per_node > 1 else 'y'} of the "
                         f"base while loading ({human_size(dense)} each)")
        if plan.offload:
            # 16-bit weight, fp32 master, gradient, two moments
            states = 18 * plan.trainable_parameters
            offloaded = (base + states) * per_node // plan.num_processes
            total += offloaded
            parts.append(f"this node's offloaded share of the base and the adapter's states "
                         f"({human_size(offloaded)})")
    total += _LAUNCHER_BYTES
    parts.append(f"the launch processes ({human_size(_LAUNCHER_BYTES)})")
    return total, " + ".join(parts)


def check_ram(needed: int, breakdown: str = "", *, available: int | None = None,
              on_cpu: bool = False) -> None:
    """UserError when `needed` bytes of host RAM exceed what is available (now, unless
    `available` is given): what the kernel can hand out without swapping."""
    if available is None:
        available = int(psutil.virtual_memory().available)
    if needed <= available:
        return
    detail = f" ({breakdown})" if breakdown else ""
    if on_cpu:
        advice = ("train with fewer worker processes (--gpus N), a shorter --seq-len or a "
                  "smaller --global-batch-size")
    else:
        advice = ("use fewer processes (--gpus N), --method qlora (a 4-bit base loads straight "
                  "onto each GPU), or --engine fsdp (one process per node loads the base)")
    raise UserError(
        f"Not enough free memory (RAM) on this machine for this run: it needs about "
        f"{human_size(needed)}{detail}, and {human_size(available)} is available now. Stop other "
        f"programs using memory, {advice}, or run on a machine with more RAM.")
