"""A full disk met by the launcher itself (tokenizing the data, writing the run files),
before any worker started: one paragraph and exit 74 instead of a traceback. What a
worker meets is run.diskfull's (detect, message)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from ftlaunch.errors import UserError
from ftlaunch.launch import interrupts
from ftlaunch.run.diskfull import NEARLY_FULL_BYTES, DISK_FULL_EXIT, detect
from ftlaunch.units import human_size as size


class LauncherDiskFull(Exception):
    """A full disk met by the launcher itself, with detect()'s account of it."""

    def __init__(self, found: dict, error: BaseException):
        super().__init__(launcher_message(found, error))
        self.found = found


@contextmanager
def told_as_full(run_dir: Path):
    """Around what the launcher writes before any worker starts (the data cache, the run
    files): a full disk there is LauncherDiskFull, one paragraph instead of a traceback."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        found = detect(exc, run_dir)
        if found is None:
            raise
        interrupts.stop_children()  # the tokenizer's pool
        raise LauncherDiskFull(found, exc) from None


def launcher_message(found: dict, error: BaseException) -> str:
    """The paragraph for a full disk met by the launcher itself (tokenizing the data,
    writing the run files), before any worker started."""
    free = found.get("free_bytes")
    text = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    if found.get("path") is None and (free is None or free >= NEARLY_FULL_BYTES):
        # The error names no file and the run's filesystem has room: another one filled
        # (the tokenizer's pool uses /dev/shm and the temporary folder).
        return (f"A disk is full: ftlaunch could not write while preparing the run ({text}). "
                f"The run directory's filesystem, {found.get('filesystem')}, "
                + (f"has {size(free)} free, " if free is not None else "")
                + "so it is another one it wrote to: /dev/shm or the temporary folder (TMPDIR) "
                "are the usual ones. Nothing was trained. Free space there (or point TMPDIR at a "
                f"larger disk), then re-run the same command. Exit code {DISK_FULL_EXIT}.")
    return (f"The disk is full: ftlaunch could not write {found.get('path') or 'the run files'} "
            f"(filesystem {found.get('filesystem')}"
            + (f", {size(free)} free now" if free is not None else "") + f": {text}) while "
            "preparing the run; nothing was trained, and the run directory is as a re-run "
            f"expects. Free space on {found.get('filesystem')} (or choose an --output-dir on a "
            f"larger disk), then re-run the same command. Exit code {DISK_FULL_EXIT}.")
