"""Files that libraries write with a mode of their own get the one the user's umask implies.

safetensors writes its files 0600 whatever the umask, so an adapter, a checkpoint or a
merged model would be unreadable by the teammates and the serving user whom the umask
lets read everything else of the run. After such files are written (and before a
checkpoint is checksummed and marked complete) they get 0o666 & ~umask: what any file
created by open() would have had, never more open than the umask allows.

No torch here: checkpoints.finalize, which the launcher imports, calls it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc): setting
    it to read it back would give a file another thread creates meanwhile the wrong mode."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # private while we look: the safe side of that race
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """Every regular file under `root` gets 0o666 & ~umask, or 0o777 & ~umask if it was
    executable (DeepSpeed's zero_to_fp32.py); symlinks are left alone."""
    mask = current_umask()
    for path in Path(root).rglob("*"):
        try:
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                continue
            mode = (0o777 if st.st_mode & 0o111 else 0o666) & ~mask
            if stat.S_IMODE(st.st_mode) != mode:
                os.chmod(path, mode)
        except OSError:
            pass  # another user's file on a shared filesystem (a peer's shard): theirs to set
