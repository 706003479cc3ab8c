"""The run directory: what a run leaves behind and how a re-run finds it.

    run.yaml          resolved config: command, plan, versions, data fingerprint
    accelerate.yaml   generated (ds_config.json too for DeepSpeed)
    checkpoints/      checkpoint-<step>/
    adapter/          final PEFT adapter + tokenizer
    metrics.jsonl     one line per logged step (and evaluation); loss.png drawn from it
    ranks/            one line per worker process (rank, world size, what it trained)

Nothing here ever deletes a run: a directory that is not ours is refused, a
changed command is refused, and --fresh moves the old run aside.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ftlaunch.errors import UserError

RUN_FILE = "run.yaml"


@dataclass(frozen=True)
class RunState:
    kind: str  # "new" | "resume" | "finished"
    checkpoint: Path | None = None
    moved_aside_to: Path | None = None


def check_writable(output_dir: Path) -> None:
    probe_dir = output_dir
    while not probe_dir.exists():
        if probe_dir == probe_dir.parent:
            break
        probe_dir = probe_dir.parent
    if probe_dir.exists() and not probe_dir.is_dir():
        raise UserError(f"--output-dir {output_dir}: {probe_dir} is a file, not a directory.")
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise UserError(f"--output-dir {output_dir} is not writable ({probe_dir} does not allow "
                        "creating files). Choose another --output-dir.")


def prepare(output_dir: Path, identity: dict, fresh: bool) -> RunState:
    """Decide between a new run, a resume and an already finished run."""
    check_writable(output_dir)
    moved = None
    if output_dir.exists() and any(output_dir.iterdir()):
        if not (output_dir / RUN_FILE).is_file():
            raise UserError(
                f"--output-dir {output_dir} exists and is not an ftlaunch run (it has no "
                f"{RUN_FILE}). ftlaunch will not write into it; choose an empty or new directory."
            )
        if fresh:
            moved = _move_aside(output_dir)
        else:
            previous = read_run_file(output_dir).get("identity", {})
            differences = describe_differences(previous, identity)
            if differences:
                raise UserError(
                    f"{output_dir} holds a run made with different settings ({'; '.join(differences)}). "
                    "Resuming it with these would mix two trainings. Re-run the original command to "
                    "resume it, pass --fresh to move it aside and start over, or pick another "
                    "--output-dir."
                )
            if is_finished(output_dir):
                return RunState("finished")
            checkpoint = last_checkpoint(output_dir)
            if checkpoint is not None:
                return RunState("resume", checkpoint=checkpoint)
    output_dir.mkdir(parents=True, exist_ok=True)
    return RunState("new", moved_aside_to=moved)


def describe_differences(previous: dict, current: dict) -> list[str]:
    keys = sorted(set(previous) | set(current))
    return [f"{k}: was {previous.get(k)!r}, now {current.get(k)!r}"
            for k in keys if previous.get(k) != current.get(k)]


def _move_aside(output_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = output_dir.with_name(f"{output_dir.name}.old-{stamp}")
    suffix = 1
    while target.exists():
        target = output_dir.with_name(f"{output_dir.name}.old-{stamp}-{suffix}")
        suffix += 1
    output_dir.rename(target)
    return target


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write beside and rename: a reader sees the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_run_file(run_dir: Path, record: dict) -> Path:
    return atomic_write(run_dir / RUN_FILE, yaml.safe_dump(record, sort_keys=False))


def read_run_file(run_dir: Path) -> dict:
    path = run_dir / RUN_FILE
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path} cannot be read ({exc}); the run directory is damaged.") from None


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "adapter" / "adapter_config.json").is_file()


def last_checkpoint(run_dir: Path) -> Path | None:
    """Newest checkpoint that the Trainer finished writing (trainer_state.json is its last file)."""
    root = run_dir / "checkpoints"
    done = [p for p in root.glob("checkpoint-*")
            if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1])) if done else None
