"""Checkpoints that are complete or do not count.

The Trainer writes a checkpoint into checkpoints/.incoming/checkpoint-<step>/.
When every rank has written its part, the saving process checksums every file,
fsyncs them, writes the marker (MARKER: the manifest, itself written beside and
renamed) and renames the directory to checkpoints/checkpoint-<step>. A
directory in checkpoints/ counts only if its marker is there and every file it
lists has the recorded size and SHA-256; anything else is torn: reported and
moved to checkpoints/set-aside/, never resumed from, never deleted.

Retention keeps the newest `keep` complete checkpoints, deleting older ones
only after a newer one is complete (it is called after the rename), through a
rename to a .deleting- name so a kill mid-delete leaves nothing that looks
like a checkpoint.

No torch here: the launcher validates checkpoints before it starts a worker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ftlaunch import filemodes
from ftlaunch.hashing import file_sha256

MARKER = "ftlaunch-checkpoint.json"
INCOMING = ".incoming"
SET_ASIDE = "set-aside"
_DELETING = ".deleting-"
_NAME = re.compile(r"^checkpoint-(\d+)$")

# Trainer-format checkpoints (adapter, optimizer.pt, rng_state_<rank>.pth) load on any
# process count; DeepSpeed and FSDP ones hold per-process shards of the optimizer.
CHECKPOINT_FORMATS = {"cpu": "trainer", "single": "trainer", "ddp": "trainer",
                      "deepspeed": "deepspeed", "fsdp": "fsdp"}


def format_of(engine: str) -> str:
    """The checkpoint format an engine writes."""
    return CHECKPOINT_FORMATS.get(engine, engine)


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    manifest: dict


@dataclass(frozen=True)
class Scan:
    complete: list[Checkpoint] = field(default_factory=list)  # oldest first
    torn: list[tuple[Path, str]] = field(default_factory=list)  # (directory, why)

    @property
    def newest(self) -> Checkpoint | None:
        return self.complete[-1] if self.complete else None


def path_at(root: Path, step: int) -> Path:
    """Where the complete checkpoint of `step` lives under `root` (checkpoints/)."""
    return root / f"checkpoint-{step}"


def step_of(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def scan(root: Path) -> Scan:
    """Every checkpoint under `root` (run_dir/checkpoints), checked file by file."""
    complete, torn = [], []
    if not root.is_dir():
        return Scan()
    incoming = root / INCOMING
    if incoming.is_dir():
        for path in sorted(p for p in incoming.iterdir() if p.is_dir()):
            torn.append((path, "it was being written when the run stopped"))
    for path in sorted(root.iterdir()):
        if not path.is_dir() or step_of(path) is None:
            continue
        problem, manifest = verify(path)
        if problem:
            torn.append((path, problem))
        else:
            complete.append(Checkpoint(step_of(path), path, manifest))
    complete.sort(key=lambda c: c.step)
    return Scan(complete, torn)


def verify(path: Path) -> tuple[str | None, dict]:
    """(None, manifest) for a complete checkpoint, else (what is wrong, {})."""
    marker = path / MARKER
    if not marker.is_file():
        return "it has no completion marker", {}
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its completion marker cannot be read", {}
    if manifest.get("step") != step_of(path):
        return f"its marker is for step {manifest.get('step')}", {}
    for name, expected in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing", {}
        size = file.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, {expected['bytes']} were written", {}
        if file_sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum", {}
    return None, manifest


def finalize(staging: Path, root: Path, manifest: dict) -> Path:
    """Mark a fully written staging directory complete and move it into `root`."""
    filemodes.follow_umask(staging)  # before the checksums: the files are final from here
    files = {}
    for file in sorted(p for p in staging.rglob("*") if p.is_file()):
        name = file.relative_to(staging).as_posix()
        if name == MARKER:
            continue
        _fsync_file(file)
        files[name] = {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
    for directory in sorted({p.parent for p in staging.rglob("*")} | {staging}):
        _fsync_dir(directory)
    manifest = {**manifest, "step": step_of(staging), "files": files}
    tmp = staging / f".{MARKER}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(staging / MARKER)
    _fsync_dir(staging)
    target = root / staging.name
    if target.exists():  # a torn leftover of the same step: keep it, out of the way
        set_aside(target, root)
    staging.replace(target)
    _fsync_dir(root)
    _fsync_dir(staging.parent)
    return target


def retain(root: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (None: keep all)."""
    if not keep:
        return []
    marked = sorted((p for p in root.iterdir() if step_of(p) is not None and (p / MARKER).is_file()),
                    key=step_of)
    deleted = []
    for path in marked[:-keep]:
        doomed = path.with_name(f"{_DELETING}{path.name}")
        path.replace(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(path)
    for leftover in root.glob(f"{_DELETING}*"):  # from a run killed mid-delete
        shutil.rmtree(leftover, ignore_errors=True)
    return deleted


def set_aside(path: Path, root: Path) -> Path:
    """Move a torn checkpoint out of the way, keeping it for inspection."""
    target_dir = root / SET_ASIDE
    target_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = target_dir / f"{path.name}-{stamp}"
    suffix = 1
    while target.exists():
        target = target_dir / f"{path.name}-{stamp}-{suffix}"
        suffix += 1
    path.replace(target)
    return target


def clear_incoming(root: Path) -> None:
    """Remove the (empty or README-only) staging area so the next save starts clean."""
    incoming = root / INCOMING
    if incoming.is_dir() and not any(p.is_dir() for p in incoming.iterdir()):
        shutil.rmtree(incoming, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and all of Windows) cannot fsync a directory
    finally:
        os.close(fd)
