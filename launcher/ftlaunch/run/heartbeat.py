"""Heartbeats: how the launcher tells a slow run from a stuck one.

Every rank rewrites ranks/heartbeat-<rank>.json whenever it makes progress (a step,
an evaluation batch, a save); the launcher reads them and, when no rank has moved for
--stall-timeout, stops the job and says where each rank was. The watch lives in the
launcher, not in a worker thread: a rank stuck in a collective or in CUDA can hold the
interpreter, and a stopped or frozen process runs no thread at all.

No torch here: the launcher imports this.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ftlaunch.files import atomic_write
from ftlaunch.run.directory import RANKS_DIR

STALL_FILE = "stalled.json"
# The phase a rank reports once training is over (evaluation, the adapter's checksum and
# save, which can gather a whole model under ZeRO-3/FSDP): the watch stands down then, and
# the collective timeout (ddp_timeout) bounds a hang.
FINISHING = "finishing"

# Within one step (micro-batches, evaluation batches) progress is written at most this
# often; a new step or phase is written at once.
_MIN_INTERVAL_S = 1.0


def path(run_dir: Path, rank: int) -> Path:
    return run_dir / RANKS_DIR / f"heartbeat-{rank}.json"


class Writer:
    """One rank's heartbeat file."""

    def __init__(self, run_dir: Path, rank: int):
        self.path = path(run_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self._last = (0.0, None)

    def beat(self, step: int, phase: str) -> None:
        now = time.time()
        if (step, phase) == self._last[1] and now - self._last[0] < _MIN_INTERVAL_S:
            return
        self._last = (now, (step, phase))
        # No fsync: a heartbeat lost to a crash of the machine does not matter, and a
        # sync per step would on a network filesystem.
        atomic_write(self.path, json.dumps({"rank": self.rank, "pid": os.getpid(),
                                            "host": socket.gethostname(), "step": step,
                                            "phase": phase, "time": now}) + "\n", sync=False)


def read(run_dir: Path) -> list[dict]:
    beats = []
    for file in (run_dir / RANKS_DIR).glob("heartbeat-*.json"):
        try:
            beats.append(json.loads(file.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue  # being replaced right now: the next look sees it
    return sorted(beats, key=lambda b: b.get("rank", 0))


@dataclass(frozen=True)
class Stall:
    """No rank made progress for `seconds` (at least the timeout)."""
    seconds: float
    timeout_s: float
    ranks: tuple[dict, ...]  # each rank's last heartbeat, with "age_s"
    silent: tuple[int, ...]  # local ranks expected but never heard from

    def describe(self) -> str:
        parts = [f"rank {b['rank']} at step {b['step']} ({b['phase']}, {b['age_s']:.0f} s ago"
                 + (f", process {b['process']}" if b.get("process") else "") + ")"
                 for b in self.ranks]
        parts += [f"rank {r} never reported" for r in self.silent]
        behind = self.behind()
        blame = (f" Rank(s) {', '.join(map(str, behind))} are behind the others: look there "
                 "first (a dead GPU, a hung data read, a failed peer)." if behind else "")
        return (f"No rank made progress for {self.seconds:.0f} s (--stall-timeout "
                f"{self.timeout_s:.0f} s): {'; '.join(parts)}.{blame}")

    def behind(self) -> list[int]:
        """Ranks at an earlier step than the furthest one, or never heard from: in
        synchronous training the others wait for them."""
        if not self.ranks:
            return list(self.silent)
        furthest = max(b["step"] for b in self.ranks)
        return sorted([b["rank"] for b in self.ranks if b["step"] < furthest] + list(self.silent))

    def to_json(self) -> dict:
        return {"seconds": round(self.seconds, 1), "timeout_s": self.timeout_s,
                "ranks": list(self.ranks), "silent": list(self.silent), "behind": self.behind()}


class Watch:
    """The launcher's side: checks this node's ranks' heartbeats (in a run directory
    shared by several nodes, the others' are theirs to watch). Armed by the first
    heartbeat of this launch (loading the model and meeting the other ranks have their
    own timeouts; an earlier launch's files do not count); from then on, a stall is
    `timeout_s` without any rank's heartbeat changing, until a rank is finishing."""

    def __init__(self, run_dir: Path, timeout_s: float, local_ranks: list[int]):
        self.run_dir = run_dir
        self.timeout_s = timeout_s
        self.local_ranks = local_ranks
        self.since = time.time()

    def check(self, now: float | None = None) -> Stall | None:
        now = time.time() if now is None else now
        beats = [b for b in read(self.run_dir)
                 if b.get("rank") in self.local_ranks and b.get("time", 0) >= self.since]
        if not beats or any(b.get("phase") == FINISHING for b in beats):
            return None
        newest = max(b["time"] for b in beats)
        if now - newest < self.timeout_s:
            return None
        seen = {b["rank"] for b in beats}
        ranks = tuple({**b, "age_s": round(now - b["time"], 1), "process": _process_state(b)}
                      for b in beats)
        silent = tuple(r for r in self.local_ranks if r not in seen)
        return Stall(now - newest, self.timeout_s, ranks, silent)


def _process_state(beat: dict) -> str | None:
    """What the rank's process is doing now, as the OS sees it (this node's ranks only):
    "stopped" or "gone" point at the culprit; "running" at a busy wait in a collective."""
    import psutil

    try:
        proc = psutil.Process(int(beat["pid"]))
        return "gone" if proc.status() == psutil.STATUS_ZOMBIE else proc.status()
    except psutil.NoSuchProcess:
        return "gone"
    except (psutil.Error, KeyError, ValueError):
        return None
