"""Per-rank logs and the first error of a failed job.

On N processes every failure prints N tracebacks, most of them consequences (a peer
went away, a collective was aborted). So each node's first rank writes to the
launcher's log (train.log, streamed to the terminal) and every other rank to its own
ranks/rank-<rank>.log; a rank that fails writes ranks/error-<rank>.json, and the
launcher names the earliest one at the end, where the user looks. An error that is a
peer's consequence (a collective whose peer went away) does not count as first while
anything else failed, and its traceback goes to the rank's own log, not the terminal.

A disk that fills mid-run can leave no room for the record itself, so each rank reserves
its record's blocks when it starts (prepare: a hidden file, removed at a normal exit) and
a failure writes over them in place and renames the file to its record's name.

No torch here: the launcher imports this.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

from ftlaunch.run import diskfull
from ftlaunch.errors import USER_ERROR_EXIT, UserError
from ftlaunch.run.directory import RANKS_DIR

_RECORD_BYTES = 4096  # reserved per rank; a record is cut to fit (messages to 500 characters)

# What a rank sees when a peer died or aborted: gloo's and NCCL's words for it.
_PEER_GONE = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|"
                        r"remote worker crashing|communicator was aborted|remote process exited|"
                        r"DistNetworkError|DistBackendError|ConnectionResetError|BrokenPipeError")


def log_path(run_dir: Path, rank: int) -> Path:
    return run_dir / RANKS_DIR / f"rank-{rank}.log"


def _error_path(run_dir: Path, rank: int) -> Path:
    return run_dir / RANKS_DIR / f"error-{rank}.json"


def _reserved_path(run_dir: Path, rank: int) -> Path:
    return run_dir / RANKS_DIR / f".error-{rank}.reserved"


def _first_on_node() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0") or 0) == 0


def is_consequence(record: dict) -> bool:
    """A failure that a peer's death or abort explains (the peer is the story)."""
    return bool(_PEER_GONE.search(f"{record.get('type')}: {record.get('message')}"))


def prepare(run_dir: Path) -> None:
    """A worker's first call: its output goes where it belongs, and its error record's
    blocks are reserved (spaces, which JSON ignores after the record) while there is room."""
    import atexit

    redirect_if_not_first(run_dir)
    path = _reserved_path(run_dir, int(os.environ.get("RANK", "0") or 0))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b" " * _RECORD_BYTES)
    except OSError:
        return  # then the record is written the ordinary way, if it can be
    atexit.register(path.unlink, missing_ok=True)  # after a failure it has been renamed


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


def record_error(run_dir: Path, exc: BaseException, main_log: Path | None = None) -> dict:
    """ranks/error-<rank>.json for the exception this rank is dying of, naming the log
    its traceback goes to (`main_log`: the launcher's, for a node's first rank)."""
    rank = int(os.environ.get("RANK", "0") or 0)
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}, line {frames[-1].lineno}" if frames else ""
    text = str(exc).strip()
    log = main_log if _first_on_node() else log_path(run_dir, rank)
    record = {"rank": rank, "time": time.time(), "type": type(exc).__name__,
              "message": text.splitlines()[0][:500] if text else "", "where": where,
              "log": str(log) if log else None, "kind": "error"}
    disk = diskfull.detect(exc, run_dir)
    if disk is not None:
        record.update(kind="disk_full", **disk)
    elif is_consequence(record):
        record["kind"] = "peer"
    _write_record(run_dir, rank, record)
    return record


def _write_record(run_dir: Path, rank: int, record: dict) -> None:
    """Over the reserved blocks, in place (no new block is needed on a full disk), then
    renamed to the record's name; without a reservation, written there directly."""
    data = json.dumps(record).encode()
    if len(data) > _RECORD_BYTES - 1:
        record = {**record, "message": record["message"][:200], "where": record["where"][-300:]}
        data = json.dumps(record).encode()[:_RECORD_BYTES - 1]
    reserved, path = _reserved_path(run_dir, rank), _error_path(run_dir, rank)
    try:
        if not reserved.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data + b"\n")
            return
        fd = os.open(reserved, os.O_WRONLY)
        try:
            size = os.fstat(fd).st_size
            os.pwrite(fd, data + b"\n" + b" " * max(size - len(data) - 1, 0), 0)
        finally:
            os.close(fd)
        reserved.replace(path)
    except OSError:
        pass  # the traceback in the log still tells


def fail(run_dir: Path, exc: BaseException) -> int | None:
    """What a worker does with the exception it is dying of: record it and return its exit
    code, or None to let Python print the traceback and exit 1. A user error is one line;
    a full disk is one line (DISK_FULL_EXIT); a node's first rank's failure caused by a
    peer sends its traceback to its own ranks/ log, so that the terminal shows the cause,
    not N consequences of it."""
    if isinstance(exc, (SystemExit, KeyboardInterrupt)):
        return None
    launcher_log = os.environ.get("FTLAUNCH_LOG")
    record = record_error(run_dir, exc, Path(launcher_log) if launcher_log else None)
    if isinstance(exc, UserError):
        _say(f"ftlaunch: {exc}")
        return USER_ERROR_EXIT
    if record["kind"] == "error" or (record["kind"] == "peer" and not _first_on_node()):
        return None
    rank = record["rank"]
    own = log_path(run_dir, rank)
    if _first_on_node():
        try:
            with open(own, "a", encoding="utf-8") as log:
                traceback.print_exception(exc, file=log)
        except OSError:
            pass
    else:
        traceback.print_exception(exc)  # this rank's stderr is its own log already
    if record["kind"] == "disk_full":
        _say(f"ftlaunch: rank {rank}: the disk is full ({record['filesystem']}: "
             f"{record['message']}); traceback in {own}")
        return diskfull.DISK_FULL_EXIT
    cause = cut(record["message"])
    _say(f"ftlaunch: rank {rank} stopped because a peer failed ({cause}); traceback in {own}")
    return 1


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass  # a full disk under the log: the launcher tells from the record


def errors(run_dir: Path, since: float = 0.0) -> list[dict]:
    """The ranks' error records written at or after `since` (this launch), earliest first."""
    found = []
    for path in (run_dir / RANKS_DIR).glob("error-*.json"):
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return sorted((e for e in found if e.get("time", 0) >= since), key=lambda e: e["time"])


def failures(run_dir: Path, since: float = 0.0, ended=()) -> list[dict]:
    """This launch's failures, the one to name first first: error records, and workers
    that ended without one (`ended`: launch.process.run's; kind "ended"). A failure a peer's
    explains comes after every other, whatever its time: the peer died first."""
    found = errors(run_dir, since)
    recorded = {e["rank"] for e in found}
    found += [{**e, "kind": "ended"} for e in ended if e["rank"] not in recorded]
    return sorted(found, key=lambda e: (is_consequence(e), e["time"]))


def in_one_line(failure: dict) -> str:
    """A failure of failures(), told in one line: the rank and its first error line."""
    if failure.get("kind") == "ended":
        return f"rank {failure['rank']} (pid {failure['pid']}) {_how_it_ended(failure, brief=True)}"
    message = cut(failure.get("message") or "")
    return f"rank {failure['rank']} failed with {failure['type']}" + (f": {message}" if message else "")


def cut(text: str, limit: int = 160) -> str:
    """A message for one line of the terminal: at most `limit` characters."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _how_it_ended(death: dict, brief: bool = False) -> str:
    code = death.get("exitcode")
    if code is None:
        return "ended without an error record (its exit status was not reported)"
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = (" (the kernel's out-of-memory killer sends it, as do schedulers and `kill -9`; "
               "`dmesg` shows the OOM killer's)" if -code == signal.SIGKILL and not brief else "")
        return f"was killed by {name}{why}, with no Python error"
    return f"exited with code {code} without an error record"


def first_error_text(run_dir: Path, main_log: Path, since: float = 0.0, ended=()) -> str | None:
    """One paragraph: the earliest failure of this launch, where its traceback is, and
    who followed."""
    found = failures(run_dir, since, ended)
    if not found:
        return None
    first = found[0]
    if first.get("kind") == "ended":
        own = log_path(run_dir, first["rank"])  # absent for a node's first rank: main_log
        log = own if own.exists() else main_log
        text = (f"First failure: rank {first['rank']} (pid {first['pid']}) "
                f"{_how_it_ended(first)}; its output is in {log}.")
    else:
        text = (f"First error: rank {first['rank']} failed with {first['type']}"
                + (f": {first['message']}" if first["message"] else "")
                + (f" ({first['where']})" if first["where"] else "")
                + f"; its traceback is in {first.get('log') or main_log}.")
    later = [str(e["rank"]) for e in found[1:]]
    if later:
        text += (f" Rank(s) {', '.join(later)} failed after it (most likely as a consequence; "
                 f"their tracebacks are in {run_dir / RANKS_DIR}/rank-<rank>.log or {main_log}).")
    return text


def failure_summary(run_dir: Path, main_log: Path, since: float, ended, code: int,
                    resume_point: str) -> tuple[str, int]:
    """(the launcher's last paragraph, its exit code) for a job that failed."""
    found = failures(run_dir, since, ended)
    if found and found[0].get("kind") == "disk_full":
        from ftlaunch.run import checkpoints

        newest = checkpoints.scan(run_dir / "checkpoints").newest
        return (diskfull.message(found[0], run_dir, resume_point,
                                 newest.path if newest else None), diskfull.DISK_FULL_EXIT)
    code = code or 1  # the workers claimed success but left no adapter
    if found and found[0].get("type") == "UserError":
        code = USER_ERROR_EXIT  # a worker's own refusal; accelerate launch reports it as 1
    first = first_error_text(run_dir, main_log, since, ended)
    return ((first + " " if first else "")
            + f"Training failed with exit code {code} (see {main_log}); after fixing the cause, "
            f"re-run the same command to resume from {resume_point}.", code)
