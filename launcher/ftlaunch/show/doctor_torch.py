"""The doctor's checks that torch answers: cuda, bf16, bitsandbytes, nccl, flash-attn.

Each takes the torch module (None when it does not import: then the check says it was
not probed) and whether a CUDA GPU is usable. The checks without torch, and Check
itself, are in doctor_checks.py.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections import Counter
from importlib import util

from ftlaunch.detect.hardware import nvidia_smi
from ftlaunch.detect.runtime import gpu_driver, torch_runtime
from ftlaunch.show.doctor_checks import Check, counted, install_command, short_error, version_check
from ftlaunch.units import GIB

_NO_TORCH = "not probed: torch does not import"
_FIX_TORCH = "Fix the torch check above first."


def import_torch():
    """(the torch module or None, why it did not import, detect.runtime.torch_runtime()
    or {}, what torch warned while looking for a GPU)."""
    try:
        import torch
    except Exception as exc:  # a broken build raises OSError or RuntimeError, not only ImportError
        return None, short_error(exc), {}, ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime = torch_runtime()  # its torch.cuda.is_available() starts CUDA
    # torch says why CUDA did not start (a driver too old, ...) in a warning.
    said = "; ".join(dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught
                                   if str(w.message).strip()))
    return torch, None, runtime, said


def cuda_check(torch, runtime: dict, said: str) -> Check:
    if torch is None:
        return Check("cuda", "warn", _NO_TORCH, _FIX_TORCH)
    hip = getattr(torch.version, "hip", None)
    cuda = runtime["torch_cuda"]
    build = f"CUDA {cuda}" if cuda else (f"ROCm {hip}" if hip else None)
    driver = gpu_driver()
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        devices = Counter(f"{torch.cuda.get_device_name(i)} "
                          f"({torch.cuda.get_device_properties(i).total_memory / GIB:.0f} GiB)"
                          for i in range(count))
        listed = ", ".join(f"{n} x {d}" if n > 1 else d for d, n in devices.items())
        return Check("cuda", "ok", f"{counted(count, 'GPU')}: {listed}; torch built with {build}"
                     f"{f', driver {driver}' if driver else ''}")
    seen = [line.strip() for line in nvidia_smi("name") or [] if line.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    version = runtime["torch"]
    slow = "ftlaunch trains on CPU worker processes (slow)"
    cpu_fix = ("For real models use a machine with an NVIDIA GPU and a CUDA build of torch; "
               "--model tiny and small models train here.")
    if visible in ("", "-1"):
        detail = f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU: {slow}"
        fix = "Unset CUDA_VISIBLE_DEVICES, or list the GPUs to use in it."
    elif build is None and seen:
        detail = (f"torch {version} is a CPU-only build, but nvidia-smi sees "
                  f"{counted(len(seen), 'GPU')} ({seen[0]}): {slow}")
        fix = ("Install the CUDA build of the same torch version for this driver (the command "
               "is at pytorch.org/get-started/locally).")
    elif build is None:
        detail = f"no CUDA GPU (torch {version} is a CPU-only build): {slow}"
        fix = cpu_fix
    elif seen:
        detail = (f"torch built with {build} cannot use the {counted(len(seen), 'GPU')} "
                  f"nvidia-smi sees{f' (driver {driver})' if driver else ''}: {slow}")
        fix = "Install a torch build whose CUDA version this driver supports, or update the driver."
    else:
        detail = f"no CUDA GPU (torch built with {build}): {slow}"
        fix = cpu_fix
    return Check("cuda", "warn", f"{detail}{f'; torch says: {said}' if said else ''}", fix)


def _capability(torch, on_gpu: bool) -> tuple[int, int] | None:
    return tuple(torch.cuda.get_device_capability(0)) if on_gpu else None


def bf16_check(torch, on_gpu: bool) -> Check:
    if torch is None:
        return Check("bf16", "warn", _NO_TORCH, _FIX_TORCH)
    if not on_gpu:
        return Check("bf16", "warn", "no CUDA GPU: ftlaunch trains in fp32 on CPU",
                     "Nothing to do for CPU training; bf16 needs an NVIDIA GPU of the Ampere "
                     "generation or newer.")
    major, minor = _capability(torch, on_gpu)
    where = f"{torch.cuda.get_device_name(0)} (sm_{major}{minor})"
    # Native bf16 only: ftlaunch plans bf16 from sm_80 on; emulation is slow.
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return Check("bf16", "ok", f"supported by {where}")
    return Check("bf16", "warn", f"{where} has no native bf16: ftlaunch trains in fp16 "
                 "mixed precision", "For steadier bf16 training use an Ampere or newer GPU "
                 "(A100, A10, L4, H100, RTX 30xx/40xx).")


def bitsandbytes_check(torch, on_gpu: bool, version: str | None, pins: dict[str, str],
                       needs: dict[str, str]) -> Check:
    if util.find_spec("bitsandbytes") is None:
        return Check("bitsandbytes", "warn", "not installed: --method qlora cannot run "
                     "(LoRA can)", f"{install_command('bitsandbytes', pins, needs)} "
                     "(only --method qlora needs it).")
    if torch is None:
        return Check("bitsandbytes", "warn", _NO_TORCH, _FIX_TORCH)
    # Importing it is the probe (its native library loads then); what it prints or warns
    # while loading, such as its CPU backend missing an optional hub kernel, is not ours.
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes
    except Exception as exc:
        return Check("bitsandbytes", "warn", f"installed but does not import: {short_error(exc)}",
                     "Reinstall it: pip install --force-reinstall bitsandbytes.")
    finally:
        logger.setLevel(level)
    version = version or str(getattr(bitsandbytes, "__version__", "version unknown"))
    lib = getattr(getattr(bitsandbytes, "cextension", None), "lib", None)
    if on_gpu and type(lib).__name__ == "ErrorHandlerMockBNBNativeLibrary":
        return Check("bitsandbytes", "warn", f"{version} imports but found no native library "
                     f"for torch's CUDA {torch.version.cuda}: --method qlora would fail",
                     "Reinstall bitsandbytes for this CUDA: pip install --force-reinstall "
                     "bitsandbytes.")
    use = ("QLoRA runs on the GPU" if on_gpu
           else "no CUDA GPU: QLoRA loads on CPU but runs slowly")
    return version_check("bitsandbytes", version, pins, needs, "warn", use)


def nccl_check(torch, runtime: dict, on_gpu: bool) -> Check:
    if torch is None:
        return Check("nccl", "warn", _NO_TORCH, _FIX_TORCH)
    dist = torch.distributed
    official = "Install an official torch build (pip install torch)."
    if not dist.is_available():
        return Check("nccl", "warn", "this torch has no torch.distributed: multi-process "
                     "training (DDP, FSDP, several CPU workers) cannot run", official)
    nccl = dist.is_nccl_available()
    if on_gpu:
        if not nccl:
            return Check("nccl", "warn", "this torch build has no NCCL: multi-GPU training "
                         "cannot run (one GPU can)",
                         "Install a Linux CUDA build of torch, which bundles NCCL.")
        return Check("nccl", "ok", f"NCCL {runtime['nccl'] or 'version unknown'}: GPU "
                     "processes communicate over it")
    built = "built in, unused" if nccl else "not in this torch build"
    if dist.is_gloo_available():
        return Check("nccl", "ok", f"no CUDA GPU: CPU worker processes communicate over gloo "
                     f"(NCCL {built})")
    return Check("nccl", "warn", "neither NCCL nor gloo: several CPU workers cannot run "
                 "(one can)", official)


def flash_attn_check(torch, on_gpu: bool, version: str | None) -> Check:
    try:
        found = util.find_spec("flash_attn") is not None
    except ValueError:  # a module object without a spec: treat as absent
        found = False
    capability = _capability(torch, on_gpu) if torch is not None else None
    ampere = capability is not None and capability >= (8, 0)
    if not found:
        if ampere:
            return Check("flash-attn", "warn", "not installed: SDPA attention is used",
                         "Optional, faster on packed rows on this GPU: pip install flash-attn "
                         "--no-build-isolation.")
        return Check("flash-attn", "ok", "not installed: SDPA attention is used (flash-attn "
                     "would need an Ampere or newer GPU)")
    version = version or "version unknown"
    if ampere:
        return Check("flash-attn", "ok", f"{version}: used for bf16/fp16 training on this GPU")
    return Check("flash-attn", "ok", f"{version}, unused here (it needs an Ampere or newer GPU): "
                 "SDPA attention is used")
