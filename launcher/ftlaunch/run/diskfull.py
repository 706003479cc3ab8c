"""A disk that fills up mid-run, told as that.

Without this, a full disk shows as whatever library was writing at the moment: torch's
"PytorchStreamWriter failed writing file data/0: file write failed", safetensors'
IoError, an OSError from a log line. A worker dying of one records it as a full disk
(rank_logs.fail), with the filesystem and its free space, and exits DISK_FULL_EXIT; the
launcher says where, how much is free against what a checkpoint of the run takes, and
that a re-run resumes from the last complete checkpoint, which a failed save never
touches (checkpoints are written beside and renamed only when whole).

No torch here: the launcher imports this.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from ftlaunch.detect.hardware import free_disk

# EX_IOERR (sysexits.h). Not PREEMPTED_EXIT (75, "try again"): re-running before space is
# freed fails the same way, so a scheduler that requeues on 75 must not loop on this.
DISK_FULL_EXIT = 74

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = re.compile(r"No space left on device|Disk quota exceeded|StorageFull")
# torch's writer drops the errno: "PytorchStreamWriter failed writing file ...: file write
# failed", or, when the failed write is noticed at the next record, "[enforce fail at
# inline_container.cc:N] . unexpected pos 576 vs 534". That is a full disk only if the disk
# is (nearly) full now, with the partly written file still on it.
_WRITE_FAILED_TEXT = re.compile(r"PytorchStreamWriter failed writing file|file write failed|"
                                r"inline_container\.cc:\d+\] \. unexpected pos")
NEARLY_FULL_BYTES = 64 * 2**20


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def detect(exc: BaseException, run_dir: Path) -> dict | None:
    """{"path", "filesystem", "free_bytes"} when `exc` is a full disk, else None. The
    path is the file being written where the error names it, else None."""
    path = None
    found = False
    for link in _chain(exc):
        if isinstance(link, OSError) and link.errno in _NO_SPACE:
            found, path = True, link.filename or path
            break
        if _NO_SPACE_TEXT.search(str(link)):
            found = True
            break
    where = Path(path) if path else run_dir
    free = _free(where)
    if not found:
        if not any(_WRITE_FAILED_TEXT.search(str(link)) for link in _chain(exc)):
            return None
        if free is None or free >= NEARLY_FULL_BYTES:
            return None  # a write failed for another reason: not to be called a full disk
    return {"path": path and str(path), "filesystem": mount_point(where), "free_bytes": free}


def _free(path: Path) -> int | None:
    try:
        return free_disk(path)[1]
    except OSError:
        return None


def mount_point(path: Path) -> str:
    path = Path(os.path.abspath(path))
    for candidate in (path, *path.parents):
        try:
            if os.path.ismount(candidate):
                return str(candidate)
        except OSError:
            continue
    return "/"


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def message(record: dict, run_dir: Path, resume_point: str, newest_checkpoint: Path | None) -> str:
    """The launcher's paragraph for a rank's disk-full record."""
    from ftlaunch.units import human_size as size

    free = _free(run_dir)
    free = free if free is not None else record.get("free_bytes")
    need = _size(newest_checkpoint) if newest_checkpoint is not None else 0
    amounts = f"{size(free)} is free there now" if free is not None else ""
    if need:
        amounts += (f"{'; ' if amounts else ''}the next checkpoint needs about "
                    f"{size(need)} (the size of {newest_checkpoint.name})")
    what = record.get("path") or f"into {run_dir}"
    return (f"The disk is full: rank {record['rank']} could not write {what} "
            f"(filesystem {record.get('filesystem')}: {record.get('message')})"
            + (f"; {amounts}" if amounts else "") + ". The last complete checkpoint is left "
            f"intact. Free space on {record.get('filesystem')} (or move the run directory to a "
            f"larger disk), then re-run the same command to resume from {resume_point}. "
            f"Exit code {DISK_FULL_EXIT}.")
