"""Units and how numbers are written for people, in one place: byte sizes, token
counts, durations."""

from __future__ import annotations

KIB = 1024
MIB = 1024**2
GIB = 1024**3


def format_gib(n: int, digits: int) -> str:
    """Bytes as GiB for people, e.g. format_gib(3 * GIB // 2, 1) == "1.5 GiB"."""
    return f"{n / GIB:.{digits}f} GiB"


def human_size(n: int | float) -> str:
    """Bytes in the largest unit they reach, to 0.1: "1.5 GiB", "640.0 KiB", "12 B"."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def duration(seconds: float) -> str:
    """0.4 s, 12 s, 4 min 10 s, 3 h 05 min, 2 d 4 h."""
    if seconds < 10:
        return f"{max(seconds, 0):.1f} s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def count(n: float) -> str:
    """1234 -> 1.2k, 5_600_000 -> 5.6M."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"
