"""Writing files so that a crash never leaves half of one."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, data: str | bytes, sync: bool = True) -> Path:
    """Write beside and rename: a reader sees the old file or the whole new one.
    sync=False for files whose loss in a machine crash does not matter (heartbeats)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if sync:
                f.flush()
                os.fsync(f.fileno())  # the rename must not land before the bytes do
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
