"""`ftlaunch resume RUN_DIR [FLAGS]`: the training command a run directory recorded, made
into the `ftlaunch train` argv that resumes it, with the flags given after RUN_DIR."""

from __future__ import annotations

from pathlib import Path

from ftlaunch.errors import UserError
from ftlaunch.run import record as run_record
from ftlaunch.run.directory import RUN_FILE

# Flags of the recorded command that would not resume it: start over, or train nothing.
_DROPPED = ("--fresh", "--dry-run")


def resume_argv(run_dir: Path, changes) -> tuple[list[str], str | None]:
    """(the `ftlaunch train` arguments that resume run_dir, `changes` after the recorded
    ones so that they win, the folder the run was started in: None where not recorded or
    gone). A UserError when run_dir is not a run directory."""
    if not (run_dir / RUN_FILE).is_file():
        raise UserError(f"{run_dir} is not an ftlaunch run directory (it has no "
                        f"{RUN_FILE}); nothing to resume. Pass the --output-dir of a "
                        "training that was started (runs/<model> by default).")
    record = run_record.load(run_dir)
    command = list(record.command)
    if command[:1] == ["train"]:
        command = command[1:]
    command = [a for a in command if a not in _DROPPED]
    argv = [*command, *changes, "--output-dir", str(run_dir.resolve())]
    cwd = record.cwd
    return argv, cwd if cwd and Path(cwd).is_dir() else None
