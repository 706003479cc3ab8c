"""How the job's worker processes ended, as the launcher sees it.

A rank killed by a signal (the kernel's OOM killer, a scheduler, a user) writes no error
record, and its peers fail a moment later with "Connection closed by peer", which alone
would blame a survivor. Only the workers' parent can wait for them: torch's elastic
agent (under `accelerate launch`) or, for a direct single-process launch, the launcher
itself. So the launcher notes each worker's rank (from its environment) and when it was
last seen alive (Watch.see, while the job runs), and reads how it ended from the agent's
failure report as it streams past (AgentReport): the agent logs each failed worker's
pid and exit code ("exitcode : -9 (pid: 123)"), which is all a signal death leaves.

That report (a traceback of the agent itself, then a table of every failure) says
nothing the launcher's summary does not say in one line, so it stays in train.log and
out of the terminal.

No torch here.
"""

from __future__ import annotations

import re
import time

# torch.distributed.elastic's words (the version pinned in constraints.txt).
_FAILED_LINE = re.compile(rb"elastic/multiprocessing/api\.py:\d+\] failed \(exitcode: (-?\d+)\) "
                          rb"local_rank: \d+ \(pid: (\d+)\)")
# The agent's note that it is stopping the others (the summary says who failed first).
_CLOSING_LINE = re.compile(rb"elastic/multiprocessing/api\.py:\d+\] Sending process \d+ closing signal")
_RANK = re.compile(rb"^\s*rank\s*:\s*(\d+) \(local_rank")
_EXIT = re.compile(rb"^\s*exitcode\s*:\s*(-?\d+) \(pid: (\d+)\)")
_MAX_REPORT_LINES = 400  # past this it is not the report we know: show the rest


class AgentReport:
    """Filters the agent's failure report out of the streamed log and keeps its facts:
    pid -> (rank or None, exit code)."""

    def __init__(self):
        self.codes: dict[int, tuple[int | None, int]] = {}
        self._carry = b""
        self._held: list[bytes] = []  # an unprefixed traceback, until we know whose
        self._state = "normal"  # normal | traceback | report
        self._rules = 0
        self._rank: int | None = None

    def feed(self, chunk: bytes, final: bool = False) -> bytes:
        """What of `chunk` the terminal should show (whole lines; the rest waits)."""
        lines = (self._carry + chunk).splitlines(keepends=True)
        self._carry = b""
        if lines and not lines[-1].endswith((b"\n", b"\r")) and not final:
            self._carry = lines.pop()
        shown = [out for line in lines for out in self._line(line)]
        if final:
            shown += self._held
            self._held = []
        return b"".join(shown)

    def _line(self, line: bytes) -> list[bytes]:
        if self._state == "report":
            return self._report_line(line)
        if self._state == "traceback":
            self._held.append(line)
            if line[:1] in (b" ", b"\t") or not line.strip():
                if len(self._held) > _MAX_REPORT_LINES:
                    return self._release()
                return []
            if b"ChildFailedError" in line:  # the agent's own traceback: its report follows
                self._held, self._state, self._rules = [], "report", 0
                return []
            return self._release()
        failed = _FAILED_LINE.search(line)
        if failed:
            pid = int(failed.group(2))
            self.codes.setdefault(pid, (None, int(failed.group(1))))
            return []
        if _CLOSING_LINE.search(line):
            return []
        if line.startswith(b"Traceback (most recent call last):"):
            self._state, self._held = "traceback", [line]
            return []
        return [line]

    def _release(self) -> list[bytes]:
        held, self._held, self._state = self._held, [], "normal"
        return held

    def _report_line(self, line: bytes) -> list[bytes]:
        rank, code = _RANK.match(line), _EXIT.match(line)
        if rank:
            self._rank = int(rank.group(1))
        elif code:
            self.codes[int(code.group(2))] = (self._rank, int(code.group(1)))
        stripped = line.strip()
        if stripped and set(stripped) == {ord("=")}:
            self._rules += 1
        self._held.append(line)
        if self._rules >= 2:  # the report's closing rule
            self._held, self._state = [], "normal"
        elif len(self._held) > _MAX_REPORT_LINES:
            return self._release()
        return []


class Watch:
    """The workers' ranks and when each was first seen gone, while the launcher watches."""

    def __init__(self, workers):
        self._workers = workers  # () -> the job's worker processes alive now (psutil)
        self.ranks: dict[int, int] = {}  # pid -> rank
        self.gone: dict[int, float] = {}  # pid -> time first seen gone
        self.report = AgentReport()
        self._stopped = False

    def see(self) -> None:
        if self._stopped:
            return
        import psutil

        alive = set()
        for proc in self._workers():
            alive.add(proc.pid)
            if proc.pid not in self.ranks:
                try:
                    self.ranks[proc.pid] = int(proc.environ().get("RANK", "0") or 0)
                except (psutil.Error, ValueError):
                    continue
        now = time.time()
        for pid in self.ranks:
            if pid not in alive:
                self.gone.setdefault(pid, now)

    def stop(self) -> None:
        """From here on the launcher itself is ending the job: deaths are its own doing."""
        self.see()
        self._stopped = True

    def ended(self, direct_pid: int | None = None, direct_code: int | None = None) -> list[dict]:
        """Workers that ended while watched, or that the agent reported failed: rank, pid,
        time, exit code (None: unknown; negative: killed by that signal). `direct_pid`: a
        worker the launcher started itself, whose exit code it has."""
        codes = dict(self.report.codes)
        if direct_pid in self.ranks and direct_code is not None:
            codes[direct_pid] = (self.ranks[direct_pid], direct_code)
        out = []
        for pid in sorted(set(self.gone) | set(codes)):
            rank, code = codes.get(pid, (None, None))
            rank = self.ranks.get(pid, rank)
            if rank is None or code == 0:
                continue
            out.append({"rank": rank, "pid": pid, "time": self.gone.get(pid, time.time()),
                        "exitcode": code})
        return out
