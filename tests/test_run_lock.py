"""One job per run directory, and a start that can be interrupted at any moment.

Real launchers, real signals, real files: a second launch (and --fresh) while a job
trains is refused naming the holder; a lock whose holder is gone is taken over with a
note; SIGTERM or Ctrl-C while the data is tokenized stops every child process with one
paragraph and 128+N, and the same command (or --fresh) then starts the run; a reader
that closes the launcher's stdout changes neither the run nor its exit code.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import (FTLAUNCH, assert_user_error, fill_disk_when, in_tmpfs, run_ftlaunch,
                      tree, wait_for)

LOCK = ".ftlaunch-lock"
TINY = ("--model", "tiny", "--gpus", "1", "--global-batch-size", "4", "--seq-len", "64",
        "--set", "logging_steps=1", "--set", "save_steps=4")


def _start(*args: str, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """The launcher in a session of its own, as a scheduler (or a terminal) starts it."""
    with open(log, "ab") as out:
        return subprocess.Popen([FTLAUNCH, *args], stdout=out, stderr=subprocess.STDOUT,
                                cwd=cwd, start_new_session=True)


def _steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "loss" in row]


def test_a_second_launch_and_fresh_are_refused_while_a_job_trains(tmp_path):
    run_dir = tmp_path / "run"
    first = _start(*TINY, "--max-steps", "40", "--output-dir", str(run_dir), log=tmp_path / "a.log")
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists(), first, 240, "the first step")
        for extra in ((), ("--fresh",)):
            second = run_ftlaunch(*TINY, "--max-steps", "40", "--output-dir", str(run_dir), *extra)
            message = assert_user_error(second, "is in use by another ftlaunch job",
                                        f"pid {first.pid} on {socket.gethostname()}",
                                        "--output-dir")
            assert "--fresh" in message
        assert first.wait(timeout=300) == 0, (tmp_path / "a.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert not list(tmp_path.glob("run.old-*")), "--fresh moved the running job aside"
    assert _steps(run_dir) == list(range(1, 41)), "another launch wrote into the run's metrics"
    assert not (run_dir / LOCK).exists(), "the lock outlived its job"


def test_two_identical_commands_started_together_train_once(tmp_path):
    run_dir = tmp_path / "run"
    argv = (*TINY, "--max-steps", "8", "--output-dir", str(run_dir))
    procs = [_start(*argv, log=tmp_path / f"{i}.log") for i in range(2)]
    codes = sorted(p.wait(timeout=300) for p in procs)
    logs = "\n".join((tmp_path / f"{i}.log").read_text() for i in range(2))
    assert codes == [0, 2], logs[-4000:]
    assert logs.count("is in use by another ftlaunch job") == 1
    assert "Traceback" not in logs
    assert _steps(run_dir) == list(range(1, 9))


def _dead_pid() -> tuple[int, float]:
    proc = subprocess.Popen(["true"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, started


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _write_lock(run_dir: Path, host: str, pid: int, started: float, age_s: float = 0) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    here = host == socket.gethostname()
    holder = {"host": host, "boot_id": _boot_id() if here else "other",
              "pid_ns": os.readlink("/proc/self/ns/pid") if here else "other", "pid": pid, "started": started, "launch": "feedfacecafe",
              "since": "2026-01-01 00:00:00 UTC", "command": "--model tiny"}
    lock = run_dir / LOCK
    lock.write_text(json.dumps(holder))
    if age_s:
        then = time.time() - age_s
        os.utime(lock, (then, then))


@pytest.mark.parametrize("holder", ["dead process here", "silent other machine"])
def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, holder):
    run_dir = tmp_path / "run"
    if holder == "dead process here":
        _write_lock(run_dir, socket.gethostname(), *_dead_pid())
        why = "is no longer running"
    else:
        _write_lock(run_dir, "node-7", 4242, 1.0, age_s=3600)
        why = "last refreshed"
    proc = run_ftlaunch(*TINY, "--max-steps", "2", "--output-dir", str(run_dir), "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "took over the lock" in proc.stdout and why in proc.stdout, proc.stdout
    assert (run_dir / "run.yaml").is_file()
    assert not (run_dir / LOCK).exists()


def test_a_lock_whose_launcher_died_waits_for_the_run_s_workers(tmp_path):
    """A launcher killed with SIGKILL leaves its workers up to --grace to checkpoint: the
    lock is not taken over while one of them (ftlaunch.worker.main --run-dir RUN_DIR) runs."""
    run_dir = tmp_path / "run"
    _write_lock(run_dir, socket.gethostname(), *_dead_pid())
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "-m",
                               "ftlaunch.worker.main", "--run-dir", str(run_dir.resolve())])
    try:
        refused = run_ftlaunch(*TINY, "--max-steps", "2", "--output-dir", str(run_dir),
                               "--dry-run")
        assert_user_error(refused, "is in use by another ftlaunch job")
    finally:
        worker.kill()
        worker.wait()
    taken = run_ftlaunch(*TINY, "--max-steps", "2", "--output-dir", str(run_dir), "--dry-run")
    assert taken.returncode == 0 and "took over the lock" in taken.stdout, taken.stderr


def test_a_live_lock_of_another_machine_is_respected(tmp_path):
    run_dir = tmp_path / "run"
    _write_lock(run_dir, "node-7", 4242, 1.0, age_s=5)
    before = tree(run_dir)
    proc = run_ftlaunch(*TINY, "--max-steps", "2", "--output-dir", str(run_dir), "--dry-run")
    assert_user_error(proc, "pid 4242 on node-7", "launch feedfacecafe")
    assert tree(run_dir) == before, "a refused launch changed the locked directory"


def test_a_refused_start_leaves_no_directory(tmp_path):
    """The lock makes the run directory; a start refused after that removes it again."""
    bad = tmp_path / "long.jsonl"  # refused once tokenized: no trained token within 32
    row = {"messages": [{"role": "user", "content": "word " * 200},
                        {"role": "assistant", "content": "ok"}]}
    bad.write_text((json.dumps(row) + "\n") * 30)
    proc = run_ftlaunch(*TINY, "--max-steps", "2", "--data", str(bad), "--seq-len", "32",
                        "--output-dir", str(tmp_path / "a" / "b" / "run"))
    assert_user_error(proc, "no example has a trained token")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.jsonl"]


def _big_data(path: Path, rows: int = 60000) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"What is {i} + {i * 7 % 1000}? Show the steps."},
                {"role": "assistant", "content": f"{i} + {i * 7 % 1000} = {i + i * 7 % 1000}."}]})
                + "\n")
    return path


@pytest.fixture(scope="module")
def big_data(tmp_path_factory) -> Path:
    """Enough rows that tokenizing them takes seconds (~15 here), in a pool of processes:
    the signal must land while it runs."""
    return _big_data(tmp_path_factory.mktemp("big") / "big.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_tokenizing_stops_every_child_and_the_same_command_starts(
        tmp_path, big_data, signum):
    run_dir = tmp_path / "run"
    argv = (*TINY, "--max-steps", "1", "--data", str(big_data), "--output-dir", str(run_dir))
    log = tmp_path / "launcher.log"
    proc = _start(*argv, log=log)
    launcher = psutil.Process(proc.pid)
    wait_for(lambda: (run_dir / "data-cache" / ".building").is_dir()
             and len(launcher.children(recursive=True)) >= 2, proc, 240, "tokenizing",
             poll=0.05)
    children = launcher.children(recursive=True)
    # Ctrl-C reaches the terminal's whole process group; a scheduler signals the launcher.
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    assert proc.wait(timeout=60) == 128 + signum
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"orphaned children: {[p.pid for p in alive]}"
    output = log.read_text()
    assert "Traceback" not in output, output[-3000:]
    name = signal.Signals(signum).name
    stop_lines = [line for line in output.splitlines() if line.startswith("ftlaunch: stopped by")]
    assert stop_lines and name in stop_lines[0] and "Re-run the same command" in stop_lines[0]
    assert not (run_dir / "run.yaml").exists() and not (run_dir / LOCK).exists()

    if signum == signal.SIGINT:
        return  # the directory is the same after either signal: one restart is enough
    # The same command starts the run (here: --fresh, which must work just as well).
    again = run_ftlaunch(*argv, "--fresh")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert not list(tmp_path.glob("run.old-*")), "a directory that never started was moved aside"


def test_a_directory_holding_only_a_data_cache_is_a_run_that_never_started(tmp_path, tiny_run):
    """What an interrupted start left before the created mark existed: the data cache."""
    import shutil

    _, finished = tiny_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(finished / "data-cache", run_dir / "data-cache")
    proc = run_ftlaunch(*TINY, "--max-steps", "2", "--output-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    other = tmp_path / "other"
    (other / "notes").mkdir(parents=True)
    refused = run_ftlaunch(*TINY, "--max-steps", "2", "--output-dir", str(other))
    assert_user_error(refused, "is not an ftlaunch run")


def test_a_closed_stdout_changes_neither_the_run_nor_its_exit_code(tmp_path):
    """`ftlaunch ... | head -1`: the reader goes away after the first line."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([FTLAUNCH, *TINY, "--max-steps", "6", "--output-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert _steps(run_dir) == list(range(1, 7))


_FILL_WHILE_TOKENIZING = r'''
M=$1; F=$2; O=$3; shift 3
"$F" "$@" --output-dir "$M/run" > "$O/out.txt" 2>&1 &
pid=$!
''' + fill_disk_when('[ -d "$M/run/data-cache/.building" ]', 0.05) + r'''
wait $pid; echo $? > "$O/code"
ls -A "$M/run" > "$O/left.txt"
'''


@pytest.mark.slow
def test_a_disk_that_fills_while_tokenizing_is_told_as_full(tmpfs_allowed, tmp_path, big_data):
    """The launcher's own writes (the data cache) meet a full disk: one paragraph naming the
    filesystem, exit 74, no traceback, no run.yaml, no lock left."""
    mount, out = tmp_path / "disk", tmp_path / "out"
    mount.mkdir()
    out.mkdir()
    argv = ["sh", "-c", _FILL_WHILE_TOKENIZING, "sh", str(mount), FTLAUNCH, str(out), *TINY,
            "--max-steps", "1", "--data", str(big_data)]
    proc = subprocess.run(in_tmpfs(mount, "256m", argv), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 97, "the tmpfs could not be mounted"
    output = (out / "out.txt").read_text()
    assert (out / "code").read_text().strip() == "74", output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "The disk is full: ftlaunch could not write" in output
    assert f"filesystem {mount}" in output and "nothing was trained" in output
    left = (out / "left.txt").read_text().split()
    assert "run.yaml" not in left and LOCK not in left, left
