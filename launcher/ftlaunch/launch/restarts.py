"""In-job restarts: a failed worker does not end the job.

When a worker fails (an exception, a rank killed by a signal or the OOM killer, a hung
collective that the stall watch ended), process.run has already stopped every process
of the job. The launcher then starts all of them again, from the newest complete
checkpoint, after a short backoff, up to --max-restarts times in one launch. Every rank
restarts, not only the one that failed: its death broke the others' collectives, and a
resume from a complete checkpoint is exact (weights, optimizer, scheduler, RNG and the
data order are in it), so a restarted job trains what an uninterrupted one would.

Not restarted, because a restart cannot help:
  - a user error (exit 2): the same input fails the same way;
  - the NaN stop: the same step overflows again; the user must change the rate;
  - a SIGTERM/SIGINT, to the launcher or to the workers: someone wants the job to stop
    (a preemption), and the stop checkpoint is already written;
  - a full disk: it is still full;
  - a failure at the same step as the failure before the last restart: deterministic
    (a batch that always runs out of memory, a kernel bug); restarting would loop.
A job on several nodes restarts only when every node agrees (multinode.restart_agreement).

No torch here.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

from ftlaunch.errors import USER_ERROR_EXIT
from ftlaunch.run import checkpoints
from ftlaunch.run import directory as rundir
from ftlaunch.run import heartbeat
from ftlaunch.run import rank_logs

# The first restart waits this long, each further one twice as long, at most
# BACKOFF_MAX_S. The dead processes have been reaped by then (process.run waits for
# them: their GPU memory is freed) and a single node picks a new port, so the wait is
# for what settles by itself (a flaky link, a filesystem's view of the checkpoint);
# a failure that keeps coming back waits longer each time.
BACKOFF_S = 2.0
BACKOFF_MAX_S = 60.0
# Where a job with no complete checkpoint resumes, as the launcher's messages say it.
FROM_THE_START = "the start (no checkpoint was completed)"


@dataclass(frozen=True)
class Attempt:
    """How one launch of the workers ended (process.run's answer), and when it started."""
    code: int
    received: int | None  # a signal the launcher received
    stall: heartbeat.Stall | None
    ended: tuple[dict, ...]  # workers that ended by themselves with a failure
    started: float  # time.time() at the launch: older error records and heartbeats do not count
    resume_step: int  # the step it started from (0: the start)


@dataclass(frozen=True)
class Failure:
    """A failed attempt, as a restart sees it."""
    what: str  # one line: which rank, its first error line (or the stall)
    step: int  # the last step a rank reported in the attempt (its resume step if none):
    # the failure came after it
    rank: int | None
    never_because: str | None = None  # why no restart can heal it (a user error, a full disk)
    consequence: bool = False  # a peer's death explains it (multinode: another node's is the cause)

    def cause(self) -> dict:
        """What the restart names: which rank, its first error line."""
        return {"rank": self.rank, "what": self.what, "consequence": self.consequence}


@dataclass(frozen=True)
class Agreement:
    """Whether the job restarts, from which checkpoint (notes: what was tidied), and,
    on several nodes, the failure that caused it (a node sees only its own ranks die)."""
    go: bool
    checkpoint: Path | None = None
    notes: tuple[str, ...] = ()
    cause: dict | None = None


def failure_of(run_dir: Path, attempt: Attempt) -> Failure | None:
    """The attempt's failure, or None when it did not fail: finished, stopped on
    purpose (a signal, the NaN stop, a preemption's checkpoint)."""
    if rundir.is_finished(run_dir) or attempt.received is not None:
        return None
    if rundir.read_stop_record(run_dir) is not None:  # the NaN stop, or the workers' SIGTERM
        return None
    step = _furthest_step(run_dir, attempt)
    if attempt.stall is not None:
        behind = attempt.stall.behind()
        return Failure(f"no rank made progress for {attempt.stall.seconds:.0f} s (a hung "
                       "collective or a stuck device"
                       + (f"; rank(s) {', '.join(map(str, behind))} behind" if behind else "")
                       + ")", step, behind[0] if behind else None)
    found = rank_logs.failures(run_dir, attempt.started, attempt.ended)
    first = found[0] if found else None
    what = (rank_logs.in_one_line(first) if first
            else f"the workers exited with code {attempt.code}")
    never_because = None
    if any(f.get("kind") == "disk_full" for f in found):
        never_because = "the disk is full; a restart would fill it again"
    elif (attempt.code == USER_ERROR_EXIT or any(f.get("type") == "UserError" for f in found)
          or any(e.get("exitcode") == USER_ERROR_EXIT for e in attempt.ended)):
        never_because = "a user error fails the same way every time"
    return Failure(what, step, first["rank"] if first else None, never_because,
                   consequence=bool(first) and rank_logs.is_consequence(first))


def _furthest_step(run_dir: Path, attempt: Attempt) -> int:
    steps = [int(b.get("step", 0)) for b in heartbeat.read(run_dir)
             if b.get("time", 0) >= attempt.started]
    return max(steps, default=attempt.resume_step)


class RestartBudget:
    """One launch's restarts: the budget, and each restart done."""

    def __init__(self, limit: int):
        self.limit = limit
        self.done: list[dict] = []

    def refusal(self, failure: Failure) -> str | None:
        """Why this failure is not restarted; None: it is."""
        if failure.never_because:
            return failure.never_because
        if self.done and self.done[-1]["step"] == failure.step:
            return (f"it failed again after step {failure.step}, as before restart "
                    f"{len(self.done)}: a failure that repeats at the same step is not healed "
                    "by restarting (a batch that always fails, a bug, a broken device)")
        if len(self.done) >= self.limit:
            return f"all {self.limit} restart(s) of --max-restarts {self.limit} are used"
        return None

    def add(self, failure: Failure, agreement: Agreement) -> dict:
        cause = agreement.cause or failure.cause()
        event = {"restart": len(self.done) + 1,
                 "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "rank": cause["rank"], "error": cause["what"], "step": failure.step,
                 "from": agreement.checkpoint.name if agreement.checkpoint else None}
        self.done.append(event)
        return event

    def backoff_s(self) -> float:
        return min(BACKOFF_S * 2 ** max(len(self.done) - 1, 0), BACKOFF_MAX_S)

    def announce(self, event: dict, backoff_s: float) -> str:
        start = event["from"] or FROM_THE_START
        return (f"restart {event['restart']} of {self.limit} in {backoff_s:.0f} s: "
                f"{event['error']}, after step {event['step']}; every worker starts again "
                f"from {start}")


def describe(done) -> list[str]:
    """The final summary's lines about a launch's restarts (run.yaml's restarts.done)."""
    return [f"  restart {e['restart']}: {e['error']}, after step {e['step']}; resumed from "
            f"{e['from'] or 'the start'}" for e in done]


def alone(run_dir: Path):
    """A single node's `agree(refusal, failure)`: it restarts unless it refuses; the torn
    checkpoints a killed worker left are set aside, and the newest complete one is
    where every worker starts again."""
    def agree(refusal: str | None, _failure: Failure) -> Agreement:
        if refusal is not None:
            return Agreement(False)
        found = checkpoints.scan(run_dir / "checkpoints")
        notes = rundir.set_aside_torn(run_dir, found)
        return Agreement(True, found.newest.path if found.newest else None, tuple(notes))
    return agree


def first_cause(failures: list[dict]) -> dict:
    """Of every node's failure (node 0's first), the one to name: the first that is not a
    peer's consequence."""
    return next((f for f in failures if f and not f.get("consequence")), failures[0])
