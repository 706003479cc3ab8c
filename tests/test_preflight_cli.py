"""A preflight failure exits 2 before any worker process exists.

Each case runs the real `ftlaunch` while a watcher polls its process tree: no
`accelerate launch` and no `ftlaunch.worker.main` process may ever appear, and the run
directory is left as it was.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time

import psutil

from conftest import FTLAUNCH, in_tmpfs

TINY = ("--model", "tiny", "--max-steps", "2", "--seq-len", "64")


def _run_watched(argv: list[str], timeout: float = 300) -> tuple[subprocess.CompletedProcess, set]:
    """Run argv; return (result, command lines of every worker-like process seen under it)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[str] = set()
    done = threading.Event()

    def watch():
        while not done.is_set():
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    try:
                        line = " ".join(child.cmdline())
                    except psutil.Error:
                        continue
                    if "accelerate.commands.launch" in line or "ftlaunch.worker.main" in line:
                        seen.add(line)
            except psutil.Error:
                pass
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = proc.communicate(timeout=timeout)
    done.set()
    watcher.join()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err), seen


def _assert_refused_before_workers(result, seen, needle: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not seen, f"worker processes were started: {seen}"
    assert "Launching" not in result.stdout


def test_a_bad_data_line_stops_before_any_worker(tmp_path):
    data = tmp_path / "train.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    data.write_text(json.dumps(good) + "\n" + '{"messages": [ oops\n')
    run_dir = tmp_path / "run"
    result, seen = _run_watched([FTLAUNCH, *TINY, "--data", str(data), "--output-dir", str(run_dir)])
    _assert_refused_before_workers(result, seen, "line 2")
    assert not run_dir.exists()


def test_a_busy_master_port_stops_before_any_worker(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result, seen = _run_watched([FTLAUNCH, *TINY, "--gpus", "2", "--master-port", str(port),
                                     "--output-dir", str(tmp_path / "run")])
    _assert_refused_before_workers(result, seen, f"--master-port {port} is already in use")
    assert not (tmp_path / "run").exists()


def test_a_full_disk_stops_before_any_worker(tmpfs_allowed, tmp_path):
    """The run directory on a real 1 MiB filesystem (a tmpfs in a private mount namespace):
    the tiny model's checkpoints, adapter and data cache need more."""
    quota = tmp_path / "quota"
    quota.mkdir()
    left = tmp_path / "left.txt"
    argv = ["sh", "-c", f'"$@"; code=$?; ls -A {quota} > {left}; exit $code', "sh",
            FTLAUNCH, *TINY, "--output-dir", str(quota / "run")]
    result, seen = _run_watched(in_tmpfs(quota, "1m", argv))
    _assert_refused_before_workers(result, seen, "Not enough free disk for this run")
    # 1 MiB less the run directory and its lock file (a few KiB) made before the check.
    free = re.search(r"has ([\d.]+) (KiB|MiB) free", result.stderr)
    assert free, result.stderr
    kib = float(free.group(1)) * (1024 if free.group(2) == "MiB" else 1)
    assert 1000 <= kib <= 1024, result.stderr
    assert left.read_text() == ""  # nothing was written on the full disk
    # The same run on a roomy filesystem passes the check (and would train).
    roomy = subprocess.run([FTLAUNCH, *TINY, "--dry-run", "--output-dir", str(tmp_path / "ok")],
                           capture_output=True, text=True, timeout=300)
    assert roomy.returncode == 0, roomy.stderr
