"""The run directory: what a run leaves behind and how a re-run finds it.

    run.yaml          the run record (ftlaunch.run.record): command, plan, versions, data
    accelerate.yaml   generated (ds_config.json too for DeepSpeed)
    checkpoints/      checkpoint-<step>/ complete ones only (ftlaunch.run.checkpoints);
                      .incoming/ being written, set-aside/ torn ones kept for inspection
    stopped.json      present after a stop on a signal with a complete checkpoint
    adapter/          final PEFT adapter + tokenizer
    metrics.jsonl     one line per logged step (and evaluation); loss.png drawn from it
    ranks/            one line per worker process (rank, world size, what it trained)
    data-cache/       the data tokenized by the launcher (ftlaunch.data.cache)
    train.log         the workers' output (train.node-R.log: node R's, on a shared dir)
    .ftlaunch-lock    the job that owns the directory now (ftlaunch.run.lock)
    .ftlaunch-run     made with the directory, so one stopped before run.yaml is known

Nothing here ever deletes a run: a directory that is not ours is refused, a
changed command is refused once a checkpoint or the adapter holds the old settings
(ftlaunch.run.resume_rules says which training settings may change), and --fresh moves
the old run aside.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ftlaunch.run import checkpoints
from ftlaunch.errors import UserError
from ftlaunch.files import atomic_write
from ftlaunch.identity import RESUME_CHANGEABLE

RUN_FILE = "run.yaml"
# Node 0 of a multi-node job marks its run directory with this + a launch id while the
# nodes meet (ftlaunch.launch.meeting): it is how other nodes find out they share the directory.
LAUNCH_MARK = ".ftlaunch-launch-"
# Made with the run directory, before anything else is written there: a directory that
# has it but no run.yaml is ftlaunch's, stopped before its first launch (never_started).
CREATED_MARK = ".ftlaunch-run"
# Written by rank 0 after a stop on a signal, once the stop's checkpoint is complete:
# how the launcher tells "preempted, resumable" from "done" and from "failed".
STOP_FILE = "stopped.json"
# The stop record's "why" for a NaN/inf loss (the others are the signal's name).
NON_FINITE_STOP = "non-finite loss"
# Per-rank files: reports, logs, heartbeats, errors.
RANKS_DIR = "ranks"


@dataclass(frozen=True)
class RunState:
    kind: str  # "new" | "resume" | "finished"
    complete: tuple[checkpoints.Checkpoint, ...] = ()  # every complete one, oldest first
    torn: tuple[tuple[Path, str], ...] = ()  # checkpoint directories that do not count, and why
    allowed_changes: tuple[str, ...] = ()  # identity differences resume.allow_changed let through
    moved_aside_to: Path | None = None
    # Identity differences accepted because no checkpoint was made with the old settings.
    restarted_with: tuple[str, ...] = ()

    @property
    def checkpoint(self) -> checkpoints.Checkpoint | None:
        """The newest complete checkpoint: the one to resume from."""
        return self.complete[-1] if self.complete else None


def check_writable(output_dir: Path) -> None:
    """UserError unless files can be made where output_dir is or will be (its nearest
    existing folder). Each message is what is wrong, then one sentence saying what to do
    (ftlaunch doctor shows them apart)."""
    import tempfile

    probe_dir = output_dir
    while not probe_dir.exists():
        if probe_dir == probe_dir.parent:
            break
        probe_dir = probe_dir.parent
    if probe_dir.exists() and not probe_dir.is_dir():
        raise UserError(f"--output-dir {output_dir}: {probe_dir} is a file, not a directory. "
                        "Choose another --output-dir (or move that file).")
    try:
        # A real file, not os.access: it also meets what access() does not ask about
        # (inode or quota exhaustion, FUSE and network filesystems, LSMs that act on open).
        # Unnamed (O_TMPFILE) where the filesystem allows; else removed at once.
        with tempfile.TemporaryFile(dir=probe_dir, prefix=".ftlaunch-probe-"):
            pass
    except OSError:
        raise UserError(f"--output-dir {output_dir} is not writable ({probe_dir} does not allow "
                        "creating files). Choose another --output-dir.") from None


def prepare(output_dir: Path, identity: dict, fresh: bool,
            allow_changed: tuple[str, ...] = ()) -> RunState:
    """Decide between a new run, a resume and an already finished run. A changed identity
    is refused once a complete checkpoint or the adapter holds the old one; before that,
    nothing trained survives, so the run starts over (restarted_with names the changes).

    Only --fresh changes anything on disk here (it moves the old run aside); torn
    checkpoints are found but set aside by set_aside_torn, once the caller has
    accepted the resume."""
    check_writable(output_dir)
    moved = None
    if output_dir.exists() and any(not hidden_own(p.name) for p in output_dir.iterdir()):
        if not (output_dir / RUN_FILE).is_file():
            if not never_started(output_dir):
                raise UserError(
                    f"--output-dir {output_dir} exists and is not an ftlaunch run (it has no "
                    f"{RUN_FILE}). ftlaunch will not write into it; choose an empty or new "
                    "directory.")
            # A start interrupted before run.yaml (while tokenizing, say): nothing trained,
            # so it is a new run, and its data cache is reused if the data is the same.
            return RunState("new")
        if fresh:
            moved = _move_aside(output_dir)
        else:
            from ftlaunch.run import record as run_record  # it imports this module

            previous = run_record.load(output_dir).identity
            differences = describe_differences(previous, identity)
            finished = is_finished(output_dir)
            found = None if finished else checkpoints.scan(output_dir / "checkpoints")
            if differences and found is not None and found.newest is None:
                # Nothing trained survives with the old settings (no complete checkpoint,
                # no adapter): nothing to mix, so the new settings simply start the run over.
                return RunState("new", torn=tuple(found.torn),
                                restarted_with=tuple(differences.values()))
            refused = [key for key in differences if key not in allow_changed]
            if refused:
                allowable = [k for k in refused if k in RESUME_CHANGEABLE]
                fixed = [k for k in refused if k not in RESUME_CHANGEABLE]
                raise UserError(
                    f"{output_dir} holds a run made with different settings "
                    f"({'; '.join(differences[k] for k in refused)}). Resuming it with these would "
                    "mix two trainings. Re-run the original command to resume it, pass --fresh to "
                    "move it aside and start over, or pick another --output-dir"
                    + (f"; if the change is deliberate, allow it with --set "
                       f"resume.allow_changed={','.join(allowable)}" if allowable else "")
                    + (f" ({' and '.join(fixed)} cannot change in a resume: the checkpoint's "
                       "weights would not load)" if fixed else "") + "."
                )
            allowed = tuple(differences[k] for k in differences if k in allow_changed)
            if finished:
                return RunState("finished")
            return RunState("resume" if found.newest else "new", complete=tuple(found.complete),
                            torn=tuple(found.torn), allowed_changes=allowed)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CREATED_MARK).touch()
    return RunState("new", moved_aside_to=moved)


def hidden_own(name: str) -> bool:
    """ftlaunch's hidden files (its lock, launch marks, the created mark): an output
    directory holding only these is as good as empty."""
    return name.startswith(".ftlaunch-")


def never_started(output_dir: Path) -> bool:
    """A directory ftlaunch made for a run that was stopped before its run.yaml was
    written. Before the created mark existed, such a directory held only the data cache."""
    if (output_dir / RUN_FILE).exists():
        return False
    if (output_dir / CREATED_MARK).is_file():
        return True
    from ftlaunch.data import cache as data_cache

    names = {p.name for p in output_dir.iterdir() if not hidden_own(p.name)}
    return names == {data_cache.DIRECTORY}


def set_aside_torn(output_dir: Path, state: RunState, move: bool = True) -> list[str]:
    """Move the torn checkpoints out of checkpoints/ (unless not `move`: a dry run only
    says so); one line per checkpoint, for the log."""
    root = output_dir / "checkpoints"
    lines = []
    for path, why in state.torn:
        line = f"{path.name} is not a complete checkpoint ({why})"
        if move and path.exists():
            line += f"; moved to {checkpoints.set_aside(path, root).relative_to(output_dir)}"
        lines.append(line)
    if move:
        checkpoints.clear_incoming(root)
    return lines


def set_aside_newer(output_dir: Path, state: RunState, step: int | None) -> list[str]:
    """Checkpoints past `step` (the newest complete on every node of a multi-node job
    with node-local run directories) move to set-aside/: training runs those steps
    again, and retention must not count them as newer than what it writes."""
    root = output_dir / "checkpoints"
    lines = []
    for checkpoint in state.complete:
        if (step is None or checkpoint.step > step) and checkpoint.path.exists():
            moved = checkpoints.set_aside(checkpoint.path, root).relative_to(output_dir)
            lines.append(f"{checkpoint.path.name} is not complete on every node; moved to {moved}")
    return lines


def describe_differences(previous: dict, current: dict) -> dict[str, str]:
    # A key the previous run did not record was not compared by the ftlaunch that made it;
    # one the current identity lacks is not known now (a dry run before the tokenizer is
    # built cannot tell the chat template): neither is a difference.
    keys = sorted(set(previous) | set(current)) if not previous else sorted(
        set(previous) & set(current))
    return {k: f"{k}: was {previous.get(k)!r}, now {current.get(k)!r}"
            for k in keys if previous.get(k) != current.get(k)}


def _move_aside(output_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = output_dir.with_name(f"{output_dir.name}.old-{stamp}")
    suffix = 1
    while target.exists():
        target = output_dir.with_name(f"{output_dir.name}.old-{stamp}-{suffix}")
        suffix += 1
    output_dir.rename(target)
    return target


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "adapter" / "adapter_config.json").is_file()


def write_stop_record(run_dir: Path, record: dict) -> Path:
    return atomic_write(run_dir / STOP_FILE, json.dumps(record) + "\n")


def read_stop_record(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / STOP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def clear_stop_record(run_dir: Path) -> None:
    (run_dir / STOP_FILE).unlink(missing_ok=True)


def metrics_rows(path: Path) -> list[dict]:
    """The readable rows of a metrics.jsonl: a run killed mid-write can leave half a line,
    and a missing or unreadable file has none."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
