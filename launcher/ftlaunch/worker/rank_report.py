"""ranks/rank-N.json: one line per rank about what it trained (its steps, a digest of its
batches, a checksum of its adapter, how its base weights are stored and sharded), which
is how tests see that all ranks trained the same thing together."""

from __future__ import annotations

import hashlib
import json
import os

from ftlaunch.run import directory as rundir
from ftlaunch.worker import peak_memory
from ftlaunch.worker import shard_report


def is_zero3(trainer) -> bool:
    """DeepSpeed partitions the parameters (ZeRO-3 tags each with a ds_id)."""
    return trainer.is_deepspeed_enabled and any(hasattr(p, "ds_id")
                                                for p in trainer.model.parameters())


def _adapter_checksum(trainer) -> str:
    """A digest of the trained adapter, the same on every rank when the ranks agree.

    Collective under ZeRO-3 and FSDP (every rank must call it): ZeRO-3 partitions the
    LoRA weights, so they are gathered first (only the trainable ones, a few MB); FSDP
    keeps each rank's shard of them, so the shards' digests are gathered and hashed in
    rank order.
    """
    model = trainer.model
    trainable = [(n, p) for n, p in sorted(model.named_parameters()) if p.requires_grad]
    if is_zero3(trainer):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
            return _digest(trainable)
    if trainer.is_fsdp_enabled and trainer.args.world_size > 1:
        import torch.distributed as dist

        shards: list = [None] * trainer.args.world_size
        dist.all_gather_object(shards, _digest(trainable))
        return hashlib.sha256("".join(shards).encode()).hexdigest()
    return _digest(trainable)


def _base_weights(model) -> str:
    """What the frozen base is stored as: "nf4" for QLoRA, else its dtype."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is not None and type(weight).__name__ == "Params4bit":
            # FSDP's flat parameters drop the weight's quant_state; bitsandbytes keeps a copy
            # on the module and puts it back at each forward.
            state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
            return state.quant_type if state is not None else weight.quant_type
    for param in model.parameters():
        if not param.requires_grad:
            return str(param.dtype).replace("torch.", "")
    return "unknown"


def _digest(named_params) -> str:
    digest = hashlib.sha256()
    for name, param in named_params:
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def write_rank_report(run_dir, trainer, recorder, result, seconds):
    import torch.distributed as dist

    state = trainer.state
    report = {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
        "pid": os.getpid(),
        "global_step": state.global_step,
        "batches": recorder.batches,
        "tokens": recorder.tokens,
        "data_digest": recorder.digest.hexdigest(),
        "adapter_checksum": _adapter_checksum(trainer),
        "base_weights": _base_weights(trainer.model),
        "sharding": shard_report.describe(trainer),
        "peak_memory": peak_memory.read(),
        "train_loss": result.training_loss,
        "seconds": round(seconds, 2),
    }
    ranks = run_dir / rundir.RANKS_DIR
    ranks.mkdir(exist_ok=True)
    (ranks / f"rank-{report['rank']}.json").write_text(json.dumps(report) + "\n", encoding="utf-8")
