"""What an FSDP1 checkpoint of a PEFT model needs to round-trip, in the worker.

Two gaps between PEFT 0.21, accelerate 1.15 and the Trainer, each of which makes
a resumed FSDP run silently differ from the uninterrupted one (measured here:
the loss left the uninterrupted run's right after the checkpoint):

1. PEFT finds the adapter's entries of a state dict by the names of its tuner
   layers (`model.named_modules()`) and whether keys carry `base_model.model.`
   by `model.named_parameters()`. Inside an auto-wrapped FSDP1 model both carry
   `_fsdp_wrapped_module.` at every unit (PEFT removes only a leading one),
   while FSDP's state dict has clean keys: nothing matches. accelerate's
   SHARDED_STATE_DICT checkpoints (adapter_only, through
   peft.get_peft_model_state_dict) then hold no adapter, resume starts from the
   initial one, and the final adapter file is empty.
2. accelerate loads the sharded optimizer state (torch distributed checkpoint)
   into a template made from the live optimizer, which has no state before its
   first step: AdamW's moments and step count are not restored.

`enable()` wraps PEFT's two public functions (accelerate imports them from
`peft` at each call) so that for an FSDP1 model, for that call only, the model
reports its module and parameter names without the wrappers' segments; and
wraps the Trainer's load_fsdp_optimizer so the optimizer's state exists (one
step at learning rate 0 on zero gradients: no weight changes) before it is
loaded. `save_adapter` gathers the final adapter. The worker calls `enable()`
for every FSDP plan, GPU or CPU.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

_WRAPPERS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def unwrapped_name(name: str) -> str:
    """`a._fsdp_wrapped_module.b` -> `a.b`, as FSDP's own state dict names it."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPERS)


@contextlib.contextmanager
def clean_names(*models):
    """For the duration, each model's named_modules / named_parameters give clean names."""
    patched = []
    try:
        for model in models:
            for method in ("named_modules", "named_parameters"):
                wrapped = getattr(model, method)

                def clean(*args, _wrapped=wrapped, **kwargs):
                    for name, item in _wrapped(*args, **kwargs):
                        yield unwrapped_name(name), item

                patched.append((model, method, model.__dict__.get(method)))
                object.__setattr__(model, method, clean)  # this instance only
        yield
    finally:
        for model, method, before in reversed(patched):
            if before is None:
                object.__delattr__(model, method)
            else:
                object.__setattr__(model, method, before)


def _is_fsdp1(model) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def enable() -> None:
    import peft
    import transformers.trainer

    original_load = transformers.trainer.load_fsdp_optimizer
    if not getattr(original_load, "_ftlaunch", False):
        @functools.wraps(original_load)
        def load_optimizer(fsdp_plugin, accelerator, optimizer, *args, **kwargs):
            materialize_state(getattr(optimizer, "optimizer", optimizer))
            return original_load(fsdp_plugin, accelerator, optimizer, *args, **kwargs)

        load_optimizer._ftlaunch = True
        transformers.trainer.load_fsdp_optimizer = load_optimizer

    for name in ("get_peft_model_state_dict", "set_peft_model_state_dict"):
        original = getattr(peft, name)
        if getattr(original, "_ftlaunch", False):
            continue

        @functools.wraps(original)
        def call(model, *args, _original=original, **kwargs):
            if not _is_fsdp1(model):
                return _original(model, *args, **kwargs)
            with clean_names(model):
                return _original(model, *args, **kwargs)

        call._ftlaunch = True
        setattr(peft, name, call)


def materialize_state(optimizer) -> None:
    """Give every parameter without optimizer state its state, by one step at learning
    rate 0 on zero gradients, so a state dict loaded into the optimizer finds every entry
    to fill. Parameters that have state sit the step out (no gradient: AdamW skips
    them), and every parameter's values are put back afterwards, whatever the optimizer
    did with a zero learning rate (an eps of 0 makes AdamW's 0/0 NaN)."""
    import torch

    params = [p for group in optimizer.param_groups for p in group["params"]]
    fresh = [p for p in params if not optimizer.state.get(p)]
    if not fresh:
        return
    rates = [group["lr"] for group in optimizer.param_groups]
    grads = [p.grad for p in params]
    kept = [p.detach().clone() for p in fresh]
    try:
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        for p in params:
            p.grad = None
        for p in fresh:
            p.grad = torch.zeros_like(p)
        optimizer.step()
    finally:
        with torch.no_grad():
            for p, value in zip(fresh, kept):
                p.copy_(value)
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        for p, grad in zip(params, grads):
            p.grad = grad


def save_adapter(fsdp_model, peft_model, staging: Path, write: bool) -> None:
    """The adapter of an FSDP1-wrapped PeftModel as plain PEFT files, written where
    `write` (global rank 0). Every rank must call: the full state dict is gathered one
    FSDP unit at a time, whole on rank 0 only (the others' hold bitsandbytes' leftovers).
    Copied to host memory as it goes on a GPU; not on CPU ranks, where FSDP's
    offload_to_cpu frees the very tensors it gathered ("storage of size 0")."""
    import torch
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    config = FullStateDictConfig(offload_to_cpu=torch.cuda.is_available(), rank0_only=True)
    with FSDP.state_dict_type(fsdp_model, StateDictType.FULL_STATE_DICT, config):
        state = fsdp_model.state_dict()
    if not write:
        return
    with clean_names(peft_model):
        peft_model.save_pretrained(staging, state_dict=state)
    from safetensors import safe_open

    with safe_open(str(staging / "adapter_model.safetensors"), "pt") as saved:
        if not list(saved.keys()):
            raise RuntimeError("the adapter saved from the FSDP model is empty: PEFT matched "
                               "none of its tensors in the gathered state dict")
