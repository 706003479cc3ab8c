"""What one rank holds once training has run: part of its report (ranks/rank-N.json).

The plan says a sharded engine keeps 1/N of the frozen base on each rank, trains
only the adapter, in fp32, and gives the frozen base no optimizer state. This
reads all of that off the wrapped model and the optimizer, so it is proven on
what trained, not on the config files: decoder layers as FSDP units, the local
bytes of frozen weights (packed 4-bit storage included), the trainable tensors'
names and dtypes, and the elements of optimizer state this rank keeps.
"""

from __future__ import annotations

from collections import Counter


def describe(trainer) -> dict:
    model = trainer.model_wrapped
    if trainer.is_fsdp_enabled:
        out = _fsdp(model)
    elif trainer.is_deepspeed_enabled:
        out = _deepspeed(model)
    else:
        out = _replicated(trainer.accelerator.unwrap_model(model))
    out["optimizer_state_numel"] = _optimizer_state_numel(trainer.optimizer)
    return out


def _fsdp(model) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from ftlaunch.worker.fsdp_checkpoint import unwrapped_name

    units = Counter(type(unit.module).__name__ for unit in FSDP.fsdp_modules(model))

    def held():
        for name, param in model.named_parameters():
            # FSDP1's flat parameters, this rank's shard of each. Not the views modules
            # show between steps (bitsandbytes re-registers its 4-bit weight as one after
            # each forward; its storage is freed when FSDP reshards).
            if getattr(param, "_is_flat_param", False):  # how FlatParameter's isinstance tells
                # A flat parameter knows the names it holds, relative to its FSDP unit.
                unit = unwrapped_name(name).removesuffix("_flat_param")
                yield [unit + fqn for fqn in getattr(param, "_fqns", ())], param

    return {"engine": "fsdp", "units": dict(sorted(units.items())), **_tally(held())}


def _deepspeed(engine) -> dict:
    persistent, partitioned = 0, 0

    def held():
        nonlocal persistent, partitioned
        for name, param in engine.module.named_parameters():
            local = getattr(param, "ds_tensor", None)  # ZeRO-3: this rank's partition
            if getattr(param, "ds_persist", False):
                # Below stage3_param_persistence_threshold: kept whole on every rank after
                # the first gather (besides its partition, which is counted too).
                if not param.requires_grad:
                    persistent += param.ds_numel * param.element_size()
            elif local is not None:
                partitioned += 1
            yield [name], (local if local is not None else param), param.requires_grad

    tally = _tally(held())
    # partitioned_parameters: those released between uses (not persistent).
    return {"engine": "deepspeed", "partitioned_parameters": partitioned,
            "frozen_bytes": tally["frozen_bytes"] + persistent,
            "persistent_frozen_bytes": persistent, "trainable": tally["trainable"]}


def _replicated(model) -> dict:
    return {"engine": "replicated", **_tally(([name], param)
                                             for name, param in model.named_parameters())}


def _tally(held) -> dict:
    """Frozen bytes and the trainable tensors over (names, tensor[, trainable]) entries:
    the tensor as this rank holds it, the names of what it holds."""
    frozen, names, dtypes, numel = 0, [], set(), 0
    for entry in held:
        held_names, tensor = entry[0], entry[1]
        trainable = entry[2] if len(entry) > 2 else tensor.requires_grad
        if trainable:
            names += held_names
            dtypes.add(_dtype(tensor))
            numel += tensor.numel()
        else:
            frozen += tensor.numel() * tensor.element_size()
    return {"frozen_bytes": frozen,
            "trainable": {"tensors": len(names), "numel": numel, "dtypes": sorted(dtypes),
                          "not_lora": sorted(n for n in names if ".lora_" not in n)[:5]}}


def _optimizer_state_numel(optimizer) -> int:
    """Elements of optimizer state on this rank (AdamW: two moments per trained element;
    under DeepSpeed its own optimizer over the flat fp32 partition it trains)."""
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    inner = getattr(inner, "optimizer", inner)  # DeepSpeed's ZeRO optimizer around torch's
    total = 0
    for state in getattr(inner, "state", {}).values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                total += value.numel()
    return total


def _dtype(tensor) -> str:
    return str(tensor.dtype).replace("torch.", "")
