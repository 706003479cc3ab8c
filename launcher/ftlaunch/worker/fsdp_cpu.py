"""FSDP on CPU processes: the one adaptation accelerate needs, in the worker only.

torch's FSDP trains on CPU ranks over gloo (FullyShardedDataParallel with
device_id cpu). accelerate 1.x stops it in places that are device bookkeeping,
none in the training itself:

- its FSDP plugin wants an accelerator device for sync_module_states, and
  torch's FSDP refuses CPU tensors there anyway: the rendered config turns
  sync_module_states and cpu_ram_efficient_loading off on CPU (render.py), so
  every rank loads the same saved weights;
- AcceleratorState turns the distributed type into FSDP only from GPU-like
  types; CPU ranks are MULTI_CPU, which stays plain DDP (silently: each rank
  holds the whole model), and one CPU process is NO, without a process group;
- it hands FSDP device_id=cpu:N, which FSDP1 rejects ("Inconsistent compute
  device and `device_id`"): a CPU tensor's device is plain `cpu`.

`enable()` wraps AcceleratorState's constructor for the last two (and makes a
gloo group of one for a single process). The worker
calls it only for a plan whose engine is FSDP on a machine without GPUs, so a
GPU run never goes through it. If the installed accelerate no longer has the
shape adapted here, it stops with a message instead of training with DDP
unawares; after the Trainer is built, `check(trainer)` proves the world really
is FSDP.
"""

from __future__ import annotations

import functools
import inspect
import os


class Unadaptable(RuntimeError):
    """The installed accelerate is not the shape this module adapts."""


def enable() -> None:
    import torch
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    state_init = AcceleratorState.__init__
    if getattr(state_init, "_ftlaunch", False):
        return
    missing = [name for name in ("MULTI_CPU", "FSDP") if not hasattr(DistributedType, name)]
    if "fsdp_plugin" not in inspect.signature(state_init).parameters:
        missing.append("AcceleratorState(fsdp_plugin=...)")
    if not isinstance(getattr(PartialState, "_shared_state", None), dict):
        missing.append("PartialState._shared_state")
    if missing:
        raise Unadaptable(f"missing {', '.join(missing)}")

    _one_process_group()

    @functools.wraps(state_init)
    def init(state, *args, **kwargs):
        state_init(state, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and state.distributed_type in (DistributedType.MULTI_CPU,
                                                              DistributedType.NO):
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = plugin
            state.device = torch.device("cpu")
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            PartialState._shared_state["device"] = state.device

    init._ftlaunch = True
    AcceleratorState.__init__ = init


def _one_process_group() -> None:
    """One CPU process is not distributed to accelerate (type NO, no process group), but
    FSDP needs a group: a gloo group of one, from torchrun's environment. (One process
    runs FSDP when a sharded run goes on with fewer processes: its checkpoints reshard.)"""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        dist.init_process_group("gloo", world_size=1, rank=0)


def check(trainer) -> None:
    """After the Trainer is built: its accelerator runs FSDP on CPU, or training stops."""
    from accelerate.utils import DistributedType

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.FSDP or state.fsdp_plugin is None:
        raise Unadaptable(f"the Trainer's accelerator runs {state.distributed_type}, not FSDP")
    if str(state.device) != "cpu":
        raise Unadaptable(f"the accelerator's device is {state.device}, not cpu")


def keep_4bit_weights_flat(model) -> None:
    """bitsandbytes repacks a 4-bit weight for its CPU kernel the first time a layer runs
    in eval mode without gradients (an evaluation), replacing the weight's data; under
    FSDP that data is a view of the flat parameter, and the next full state dict (the
    adapter at the end) fails in bitsandbytes' unpacking. The CPU kernel is a speed-up
    only: turned off here, evaluation runs the same matmul as training."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def message(exc: Unadaptable) -> str:
    import accelerate

    return (f"--engine fsdp on CPU processes needs ftlaunch's adaptation of accelerate "
            f"(ftlaunch.worker.fsdp_cpu), and accelerate {accelerate.__version__} no longer has the "
            f"shape it adapts: {exc}. Nothing was trained. Use the accelerate version in "
            "ftlaunch's constraints.txt, or leave --engine out (DDP over gloo) on this machine.")
