"""A worker's peak memory while it trains: what the plan's per-device peak models.

Loading is not training: every FSDP rank on CPU loads the whole model before it is
sharded, QLoRA quantizes from 16-bit weights, and the caching allocators keep what
that used. So the peak is reset when training begins (after loading and wrapping)
and read at each logged step: on a GPU torch's allocated and reserved peaks, on CPU
the resident set's high-water mark (Linux's VmHWM, reset through clear_refs after
handing freed heap back with malloc_trim). The process's own peak, loading
included, is reported beside it on CPU (the launcher's RAM check is about that one).
"""

from __future__ import annotations

import ctypes
import resource
from pathlib import Path

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


_loading_peak = 0  # bytes: the process's peak before reset(), which clear_refs also resets
_at_start = None  # bytes resident when training began (CPU)


def reset() -> None:
    global _loading_peak, _at_start
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    _loading_peak = max(_loading_peak, _process_peak())
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS first
    except (OSError, AttributeError):
        pass
    try:
        _CLEAR_REFS.write_text("5")  # VmHWM := VmRSS (Linux >= 4.0, proc(5))
    except OSError:
        pass
    _at_start = _status("VmRSS")


def read() -> dict:
    """{"peak_memory_gib": ..., and on a GPU "peak_memory_reserved_gib", on CPU
    "process_peak_memory_gib" (ru_maxrss: loading included)}."""
    import torch

    if torch.cuda.is_available():
        return {"peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                "peak_memory_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}
    now = _process_peak()
    out = {"peak_memory_gib": round((_status("VmHWM") or now) / 2**30, 3),
           "process_peak_memory_gib": round(max(now, _loading_peak) / 2**30, 3)}
    if _at_start is not None:  # what was resident before the first step: weights, leftovers
        out["resident_at_start_gib"] = round(_at_start / 2**30, 3)
    return out


def _process_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _status(field: str) -> int | None:
    """A /proc/self/status memory field in bytes (VmRSS, VmHWM), None where there is none."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
