"""Per-rank logs and the first error of a failed job.

On N processes every failure prints N tracebacks, most of them consequences (a peer
went away, a collective was aborted). So each node's first rank writes to the
launcher's log (train.log, streamed to the terminal) and every other rank to its own
ranks/rank-<rank>.log; a rank that fails writes ranks/error-<rank>.json, and the
launcher names the earliest one at the end, where the user looks.

No torch here: the launcher imports this.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

from ftlaunch.rundir import RANKS_DIR


def log_path(run_dir: Path, rank: int) -> Path:
    return run_dir / RANKS_DIR / f"rank-{rank}.log"


def _error_path(run_dir: Path, rank: int) -> Path:
    return run_dir / RANKS_DIR / f"error-{rank}.json"


def _first_on_node() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0") or 0) == 0


def redirect_if_not_first(run_dir: Path) -> None:
    """In a worker, before it trains: a rank that is not its node's first sends its
    stdout and stderr (file descriptors, so C libraries and faulthandler follow) to its
    own log. (Importing the training module prints nothing: ftlaunch.quiet.)"""
    if _first_on_node():
        return
    rank = int(os.environ.get("RANK", "0") or 0)
    path = log_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)


def record_error(run_dir: Path, exc: BaseException, main_log: Path | None = None) -> None:
    """ranks/error-<rank>.json for the exception this rank is dying of, naming the log
    its traceback goes to (`main_log`: the launcher's, for a node's first rank)."""
    rank = int(os.environ.get("RANK", "0") or 0)
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}, line {frames[-1].lineno}" if frames else ""
    text = str(exc).strip()
    log = main_log if _first_on_node() else log_path(run_dir, rank)
    record = {"rank": rank, "time": time.time(), "type": type(exc).__name__,
              "message": text.splitlines()[0][:500] if text else "", "where": where,
              "log": str(log) if log else None}
    try:
        path = _error_path(run_dir, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    except OSError:
        pass  # the traceback in the log still tells


def errors(run_dir: Path, since: float = 0.0) -> list[dict]:
    """The ranks' error records written at or after `since` (this launch), earliest first."""
    found = []
    for path in (run_dir / RANKS_DIR).glob("error-*.json"):
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return sorted((e for e in found if e.get("time", 0) >= since), key=lambda e: e["time"])


def first_error_text(run_dir: Path, main_log: Path, since: float = 0.0) -> str | None:
    """One paragraph: the earliest failure of this launch, where its traceback is, and
    who followed."""
    found = errors(run_dir, since)
    if not found:
        return None
    first = found[0]
    text = (f"First error: rank {first['rank']} failed with {first['type']}"
            + (f": {first['message']}" if first["message"] else "")
            + (f" ({first['where']})" if first["where"] else "")
            + f"; its traceback is in {first.get('log') or main_log}.")
    later = [str(e["rank"]) for e in found[1:]]
    if later:
        text += f" Rank(s) {', '.join(later)} failed after it (most likely as a consequence)."
    return text
