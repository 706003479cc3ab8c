"""One job per run directory: a lock file that names its holder.

Two launchers in one run directory (a scheduler's duplicated requeue, a second
terminal, `--fresh` while a job trains) would set each other's checkpoints aside and
interleave their metrics. So a launcher holds RUN_DIR/.ftlaunch-lock from before it
reads the run until it exits.

Why not flock: multi-node runs keep their run directory on NFS, Lustre or a FUSE
mount, where flock is local to one machine, emulated, or a no-op. Instead the
lock is taken the way that is atomic on those filesystems too: the holder record is
written to a file of its own name, then hard-linked to the lock's name (link fails
if the name exists, on NFS as on local disk). The holder touches the lock every
REFRESH_S seconds; a lock is stale when its holder is gone:
  - same machine (host name, boot id and pid namespace): the holder's pid is not
    alive, or is another process now (its start time differs), and no worker of the
    run is still running (a launcher killed with SIGKILL leaves its workers up to
    --grace to write their checkpoint);
  - another machine: not touched for STALE_S, by the filesystem's own clock (the
    age is read against a file made just now, so clock skew between machines
    does not count).
A stale lock is taken over with a note. Joining nodes of a multi-node launch share
node 0's lock and take none (launch/multinode.py).

No torch here.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from ftlaunch.run import directory as rundir
from ftlaunch.run import record as run_record
from ftlaunch.errors import UserError

LOCK = ".ftlaunch-lock"
REFRESH_S = 30.0
# Ten missed refreshes: NFS clients cache attributes for up to a minute, and a launcher
# busy in a long fsync must not lose its directory.
STALE_S = 300.0


@dataclass(frozen=True)
class Holder:
    host: str
    boot_id: str
    pid_ns: str  # containers on one host share its name and boot id, not their pids
    pid: int
    started: float  # the process's start time: a reused pid is another process
    launch: str
    since: str
    command: str

    def describe(self) -> str:
        return (f"pid {self.pid} on {self.host} (launch {self.launch}, since {self.since}"
                + (f": ftlaunch {self.command}" if self.command else "") + ")")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _me(command: list[str]) -> Holder:
    import psutil

    return Holder(host=socket.gethostname(), boot_id=_boot_id(), pid_ns=_pid_ns(), pid=os.getpid(),
                  started=psutil.Process().create_time(), launch=uuid.uuid4().hex[:12],
                  since=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  command=" ".join(command)[:300])


class RunLock:
    """Held from acquire() to release(); refreshes itself from a daemon thread."""

    def __init__(self, run_dir: Path, holder: Holder, created: list[Path], before):
        self.run_dir = run_dir
        self.holder = holder
        self._created = created  # directories this lock made, deepest first
        self._before = before  # _snapshot() of the directory before the lock, if it existed
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._refresh, daemon=True,
                                        name="ftlaunch-run-lock")
        self._thread.start()

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK

    def _mine(self) -> bool:
        found = _read(self.path)
        return found is not None and found.launch == self.holder.launch

    def _refresh(self) -> None:
        while not self._done.wait(REFRESH_S):
            try:
                if self._mine():
                    os.utime(self.path)
                    continue
            except OSError:
                continue  # a filesystem hiccup; the next refresh tries again
            if not self._done.is_set():
                # Refreshes stalled past STALE_S (a hung NFS server) and another launch took
                # the directory: say so where the user looks, once.
                taker = _read(self.path)
                print(f"ftlaunch: warning: the lock of {self.run_dir} was taken over by "
                      f"{taker.describe() if taker else 'another launch'}; two jobs may now "
                      "write there. Stop one of them.", file=sys.stderr, flush=True)
                return

    def follow(self, moved_to: Path) -> None:
        """--fresh renamed the run directory (lock and all) to `moved_to` and made a new
        one: the lock belongs in the new one. Nobody can hold it there yet unless a job
        started in the moment between: that job keeps it, this one stops."""
        try:
            if _read(moved_to / LOCK) == self.holder:
                (moved_to / LOCK).unlink()
        except OSError:
            pass
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not _try_link(self.run_dir, self.holder):
            raise UserError(_busy_message(self.run_dir, _read(self.run_dir / LOCK)))

    def put_back(self, moved: Path) -> bool:
        """Undo --fresh's move when the start is refused: the previous run goes back to
        its place, still under this lock, and the new directory (whatever a failed start
        left in it) goes. False when that cannot be done: the previous run stays where
        --fresh put it."""
        import shutil

        scratch = self.run_dir.with_name(f".{self.run_dir.name}.ftlaunch-refused-"
                                         f"{self.holder.launch}")
        try:
            if not _try_link(moved, self.holder):
                return False
            os.rename(self.run_dir, scratch)  # the new directory, its lock and mark
            try:
                os.rename(moved, self.run_dir)
            except OSError:  # something took the place in the moment between
                if _read(moved / LOCK) == self.holder:
                    (moved / LOCK).unlink()
                with contextlib.suppress(OSError):
                    os.rename(scratch, self.run_dir)
                return False
        except OSError:
            return False
        shutil.rmtree(scratch, ignore_errors=True)
        return True

    def release(self) -> None:
        """Give the directory up. A launch that wrote nothing there (refused, or nothing
        to do) leaves it as it found it."""
        self._done.set()
        try:
            if self._mine():
                if _listing(self.run_dir) == frozenset():  # the created mark says nothing
                    (self.run_dir / rundir.CREATED_MARK).unlink(missing_ok=True)
                self.path.unlink()  # only now: another launch may take it at once
        except OSError:
            pass
        _leave_as_found(self.run_dir, self._created, self._before)


def _leave_as_found(run_dir: Path, created: list[Path], before) -> None:
    """Directories the lock made are removed if empty (only this launch's files ever are:
    another launch's lock in them keeps them), and the directory mtime that the lock file
    moved is put back unless the run changed (its names or its run.yaml)."""
    for directory in created:
        try:
            directory.rmdir()
        except OSError:
            break
    if before is not None and _snapshot(run_dir) == before[:2]:
        try:
            os.utime(run_dir, ns=before[2])
        except OSError:
            pass


def _listing(run_dir: Path) -> frozenset | None:
    try:
        return frozenset(p.name for p in run_dir.iterdir() if not rundir.hidden_own(p.name))
    except OSError:
        return None


def _snapshot(run_dir: Path) -> tuple:
    """What a launch that trained or wrote its run files changes: the names in the
    directory, or run.yaml (rewritten by every start)."""
    try:
        run_file = (run_dir / rundir.RUN_FILE).stat().st_mtime_ns
    except OSError:
        run_file = None
    return _listing(run_dir), run_file


def acquire(run_dir: Path, command: list[str]) -> tuple[RunLock, str | None]:
    """The lock of `run_dir` (made, with its parents, if missing), and a note when a
    stale lock was taken over. UserError naming the holder when another job has it."""
    run_dir = Path(run_dir)
    stat = run_dir.stat() if run_dir.is_dir() else None
    before = (*_snapshot(run_dir), (stat.st_atime_ns, stat.st_mtime_ns)) if stat else None
    created = _make_dirs(run_dir)
    me = _me(command)
    note = None
    try:
        for _ in range(3):
            if _try_link(run_dir, me):
                return RunLock(run_dir, me, created, before), note
            holder, age = _read(run_dir / LOCK), _age(run_dir)
            if holder is None and age is None:
                continue  # released between our link and our read: try again
            why = _stale_reason(run_dir, holder, age)
            if why is None:
                raise UserError(_busy_message(run_dir, holder))
            if _take_over(run_dir, holder):
                note = (f"took over the lock of {run_dir} from "
                        f"{holder.describe() if holder else 'an unreadable holder'}: {why}")
        raise UserError(f"{run_dir}: its lock changed hands while this launch was taking it "
                        "over; another ftlaunch job is starting there. Check for a second "
                        "launch of this run, then re-run.")
    except BaseException:
        _leave_as_found(run_dir, created, before)
        raise


def _make_dirs(run_dir: Path) -> list[Path]:
    missing = []
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    return missing  # deepest first


def _try_link(run_dir: Path, me: Holder) -> bool:
    own = run_dir / f"{LOCK}.{me.launch}"
    with open(own, "w", encoding="utf-8") as f:
        json.dump(asdict(me), f)
        f.flush()
        os.fsync(f.fileno())  # the lock never names a holder whose record is not on disk
    try:
        os.link(own, run_dir / LOCK)
        return True
    except FileExistsError:
        return False
    except OSError:
        # NFS can report an error for a link that was made (a lost reply): the link count
        # of our own file says what happened.
        return os.stat(own).st_nlink == 2
    finally:
        own.unlink(missing_ok=True)


def _read(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def _age(run_dir: Path) -> float | None:
    """Seconds since the lock was last touched, by the filesystem's clock."""
    probe = run_dir / f"{LOCK}.probe-{uuid.uuid4().hex[:8]}"
    try:
        lock_mtime = (run_dir / LOCK).stat().st_mtime
        probe.touch()
        return max(0.0, probe.stat().st_mtime - lock_mtime)
    except FileNotFoundError:
        return None
    finally:
        probe.unlink(missing_ok=True)


def _stale_reason(run_dir: Path, holder: Holder | None, age: float | None) -> str | None:
    """Why the lock's holder is gone, or None while it may be alive."""
    if holder is not None and (holder.host, holder.boot_id, holder.pid_ns) == (
            socket.gethostname(), _boot_id(), _pid_ns()):
        import psutil

        try:
            if abs(psutil.Process(holder.pid).create_time() - holder.started) < 1.0:
                return None
        except psutil.Error:
            pass
        if _workers_running(run_dir):
            return None
        return f"its process {holder.pid} is no longer running"
    if age is not None and age > STALE_S:
        return f"it was last refreshed {age:.0f} s ago"
    return None


def _workers_running(run_dir: Path) -> bool:
    """A worker of this run still alive on this machine (ftlaunch.worker.main --run-dir RUN_DIR):
    its launcher is gone, but it may still be writing its last checkpoint."""
    import psutil

    target = str(run_dir.resolve())
    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info.get("cmdline") or []
        if run_record.is_worker_command(args) and "--run-dir" in args:
            at = args.index("--run-dir") + 1
            if at < len(args) and args[at] == target:
                return True
    return False


def _take_over(run_dir: Path, judged: Holder | None) -> bool:
    """Move the stale lock out of the way, unless it changed since it was judged (then
    it is put back). True when the way is free for a new link."""
    aside = run_dir / f"{LOCK}.stale-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(run_dir / LOCK, aside)
    except FileNotFoundError:
        return False  # someone released or took it meanwhile; the next try sees which
    try:
        moved = _read(aside)
        if (moved.launch if moved else None) != (judged.launch if judged else None):
            try:
                os.link(aside, run_dir / LOCK)  # a fresh lock, renamed by mistake: back
            except FileExistsError:
                pass
            return False
        return True
    finally:
        aside.unlink(missing_ok=True)


def _busy_message(run_dir: Path, holder: Holder | None) -> str:
    who = holder.describe() if holder else "a job whose lock record cannot be read"
    return (f"{run_dir.resolve()} is in use by another ftlaunch job: {who}. Two jobs in one run "
            "directory would mix their checkpoints and metrics, so this one does not start "
            "(with --fresh too). Wait for that job to end, stop it (SIGTERM: it checkpoints "
            "and exits), or choose another --output-dir. A lock whose job is gone is taken "
            f"over on its own: at once on the same machine, after {STALE_S / 60:.0f} minutes "
            "without a refresh from another.")
