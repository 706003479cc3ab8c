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

DIRECTORY = "ranks"


def log_path(run_dir: Path, rank: int) -> Path:
    return run_dir / DIRECTORY / f"rank-{rank}.log"


def _error_path(run_dir: Path, rank: int) -> Path:
    return run_dir / DIRECTORY / f"error-{rank}.json"


def redirect_if_not_first(run_dir: Path) -> None:
    """In a worker, before anything prints: a rank that is not its node's first sends
    its stdout and stderr (file descriptors, so C libraries and faulthandler follow)
    to its own log."""
    if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
        return
    rank = int(os.environ.get("RANK", "0") or 0)
    path = log_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)


def record_error(run_dir: Path, exc: BaseException) -> None:
    """ranks/error-<rank>.json for the exception this rank is dying of."""
    rank = int(os.environ.get("RANK", "0") or 0)
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}, line {frames[-1].lineno}" if frames else ""
    record = {"rank": rank, "time": time.time(), "type": type(exc).__name__,
              "message": str(exc).strip().splitlines()[0][:500] if str(exc).strip() else "",
              "where": where}
    try:
        path = _error_path(run_dir, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    except OSError:
        pass  # the traceback in the log still tells


def clear(run_dir: Path, ranks: list[int]) -> None:
    for rank in ranks:
        _error_path(run_dir, rank).unlink(missing_ok=True)


def errors(run_dir: Path) -> list[dict]:
    """The ranks' error records, earliest first."""
    found = []
    for path in (run_dir / DIRECTORY).glob("error-*.json"):
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda e: e.get("time", 0))


def first_error_text(run_dir: Path, main_log: Path) -> str | None:
    """One paragraph: the earliest failure, where its traceback is, and who followed."""
    found = errors(run_dir)
    if not found:
        return None
    first = found[0]
    log = main_log if first["rank"] == 0 or not log_path(run_dir, first["rank"]).exists() \
        else log_path(run_dir, first["rank"])
    text = (f"First error: rank {first['rank']} failed with {first['type']}"
            + (f": {first['message']}" if first["message"] else "")
            + (f" ({first['where']})" if first["where"] else "")
            + f"; its traceback is in {log}.")
    later = [str(e["rank"]) for e in found[1:]]
    if later:
        text += f" Rank(s) {', '.join(later)} failed after it (most likely as a consequence)."
    return text
