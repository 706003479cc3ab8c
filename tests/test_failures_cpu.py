"""Failures told as what they are, on real tiny trainings: a disk that fills mid-run
(a real tmpfs, filled for real) is reported as a full disk, exits 74 and resumes; a rank
killed by a real SIGKILL is named as the first failure, not the survivor that lost it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import psutil
import yaml

from conftest import FTLAUNCH, cores, fill_disk_when, in_tmpfs, wait_for
from ftlaunch.run import heartbeat

DISK_FULL = 74
_TRAIN = ("--model", "tiny", "--gpus", "1", "--global-batch-size", "4", "--seq-len", "64",
          "--set", "logging_steps=1", "--set", "save_steps=3")

# Inside the private mount namespace (the run directory lives on the tmpfs, which nobody
# outside sees): train until a checkpoint is complete, fill the disk, let the run fail;
# try torch.save on the full disk; free the space and run the same command again.
_SCRIPT = r'''
M=$1; F=$2; O=$3; PY=$4; shift 4
run=$M/run
"$F" "$@" --max-steps 100000 --output-dir "$run" > "$O/first.txt" 2>&1 &
pid=$!
''' + fill_disk_when('[ -f "$run/checkpoints/checkpoint-3/ftlaunch-checkpoint.json" ]', 0.1) + r'''
wait $pid; echo $? > "$O/first.code"
"$PY" -c "$TORCH_SAVE" "$M" > "$O/torch.json" 2>&1
newest=$(ls -d "$run"/checkpoints/checkpoint-* | sed 's/.*-//' | sort -n | tail -1)
echo "$newest" > "$O/newest.txt"
rm -f "$M/filler" "$M/x.pt"
"$F" "$@" --max-steps $((newest + 2)) --output-dir "$run" > "$O/second.txt" 2>&1
echo $? > "$O/second.code"
'''

_TORCH_SAVE = r'''
import json, sys
from pathlib import Path
import torch
from ftlaunch.run import diskfull
try:
    torch.save(torch.zeros(1 << 20), sys.argv[1] + "/x.pt")
    print(json.dumps({"raised": False}))
except Exception as exc:
    print(json.dumps({"raised": True, "message": str(exc)[:300],
                      "detected": diskfull.detect(exc, Path(sys.argv[1]))}))
'''


def test_a_disk_that_fills_mid_run_is_reported_as_full_and_the_run_resumes(
        tmpfs_allowed, tmp_path):
    mount, out = tmp_path / "disk", tmp_path / "out"
    mount.mkdir()
    out.mkdir()
    argv = ["sh", "-c", _SCRIPT, "sh", str(mount), FTLAUNCH, str(out), sys.executable, *_TRAIN]
    proc = subprocess.run(in_tmpfs(mount, "128m", argv), capture_output=True, text=True,
                          timeout=900, env={**os.environ, "TORCH_SAVE": _TORCH_SAVE})
    assert proc.returncode != 97, "the tmpfs could not be mounted"
    first = (out / "first.txt").read_text()
    code = (out / "first.code").read_text().strip()
    assert code == str(DISK_FULL), f"exit {code}:\n{first[-3000:]}\n{proc.stderr[-2000:]}"
    summary = first.strip().splitlines()[-1]
    newest = (out / "newest.txt").read_text().strip()
    assert summary.startswith("The disk is full: rank 0 could not write "), summary
    assert f"filesystem {mount}" in summary and "is free there now" in summary
    assert f"the size of checkpoint-{newest}" in summary, summary
    assert f"resume from checkpoint-{newest}. Exit code {DISK_FULL}." in summary
    assert "Traceback" not in first, first[-3000:]

    # torch's writer names no errno; on the full disk its error is still told as one.
    saved = json.loads((out / "torch.json").read_text().strip().splitlines()[-1])
    assert saved["raised"], saved
    assert saved["detected"] and saved["detected"]["filesystem"] == str(mount), saved

    second = (out / "second.txt").read_text()
    assert (out / "second.code").read_text().strip() == "0", second[-3000:]
    assert f"from checkpoint-{newest}" in second, second[-3000:]


def test_the_disk_full_exit_code_is_documented():
    from ftlaunch.run import diskfull
    from ftlaunch.launch import process

    assert diskfull.DISK_FULL_EXIT == DISK_FULL
    help_text = subprocess.run([FTLAUNCH, "train", "--help"], capture_output=True, text=True,
                               timeout=120).stdout
    assert f"{DISK_FULL} the disk filled up" in help_text
    assert f"DISK_FULL_EXIT ({DISK_FULL}" in process.__doc__


@pytest.mark.slow
@pytest.mark.skipif(cores() < 2, reason="two CPU workers need two cores")
def test_a_rank_killed_by_a_signal_is_named_first(tmp_path):
    """SIGKILL to rank 1 of 2 (what the OOM killer sends), with --max-restarts 0 (the job
    ends at its first failure, as before in-job restarts): rank 0 fails in the next
    collective ("Connection closed by peer"). The summary names rank 1 and the signal;
    rank 0's traceback and the agent's failure report stay in the files."""
    run_dir = tmp_path / "run"
    args = ["--model", "tiny", "--gpus", "2", "--global-batch-size", "4", "--seq-len", "64",
            "--max-steps", "100000", "--set", "logging_steps=1", "--set", "save_steps=3",
            "--max-restarts", "0", "--output-dir", str(run_dir)]
    launcher = subprocess.Popen([FTLAUNCH, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    beats: list[dict] = []
    try:
        def both_past_step_2():
            seen = heartbeat.read(run_dir)
            return seen if len(seen) == 2 and all(b["step"] >= 2 for b in seen) else None

        beats = wait_for(both_past_step_2, launcher, 300, "both ranks at step 2")
        killed = next(b for b in beats if b["rank"] == 1)
        os.kill(killed["pid"], signal.SIGKILL)
        out, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for beat in beats:
            if psutil.pid_exists(beat["pid"]):
                os.kill(beat["pid"], signal.SIGKILL)
    assert launcher.returncode == 1, out
    assert "ftlaunch: restart " not in out and "not restarted" not in out, out
    assert yaml.safe_load((run_dir / "run.yaml").read_text())["restarts"] == {"max": 0, "done": []}
    summary = next(line for line in out.splitlines() if line.startswith("First "))
    assert summary.startswith(f"First failure: rank 1 (pid {killed['pid']}) was killed by "
                              "SIGKILL"), summary
    assert re.search(r"Rank\(s\) 0 failed after it", summary), summary
    # The terminal: the cause, not the consequences' tracebacks nor torchrun's report.
    for noise in ("Traceback", "ChildFailedError", "Root Cause", "failed (exitcode"):
        assert noise not in out, f"{noise!r} on the terminal:\n{out[-4000:]}"
    # The files: all of it.
    assert "Traceback" in (run_dir / "ranks" / "rank-0.log").read_text()
    log = (run_dir / "train.log").read_text()
    assert "ChildFailedError" in log and f"exitcode  : -9 (pid: {killed['pid']})" in log


# --- the pieces, without a training --------------------------------------------------------

# What torch's elastic agent (the version in constraints.txt) wrote after rank 1's SIGKILL,
# around rank 0's own line, as captured from a real 2-process run.
_AGENT_REPORT = b"""[--------------------] step 3/100000   0% | loss 6.2383
E1206 02:43:17.026000 4114 .venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -9) local_rank: 1 (pid: 4118) of binary: /x/python
W1206 02:48:55.185000 8277 .venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 4117 closing signal SIGTERM
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/x/accelerate/commands/process.py", line 1419, in main
    launch_command(args)
           ^^^^^^^^^^^^^
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
============================================================
ftlaunch.worker.main FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-06_02:43:17
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 4117) 
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-06_02:43:15
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 4118)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4118
============================================================
after the report
Traceback (most recent call last):
  File "train.py", line 3, in <module>
ValueError: a worker's own traceback stays
"""


@pytest.mark.parametrize("piece", [7, 100, 10_000])
def test_the_agent_report_is_read_and_kept_off_the_terminal(piece):
    from ftlaunch.launch.rank_deaths import AgentReport

    report, shown = AgentReport(), b""
    for i in range(0, len(_AGENT_REPORT), piece):  # however the stream is cut
        shown += report.feed(_AGENT_REPORT[i:i + piece])
    shown += report.feed(b"", final=True)
    assert report.codes == {4118: (1, -9), 4117: (0, 1)}
    text = shown.decode()
    assert text.startswith("[--------------------] step 3/100000")
    for gone in ("ChildFailedError", "Root Cause", "failed (exitcode", "closing signal",
                 "launch_command"):
        assert gone not in text
    assert "after the report\nTraceback (most recent call last):" in text
    assert text.endswith("ValueError: a worker's own traceback stays\n")


def test_a_killed_rank_comes_before_the_peer_that_lost_it(tmp_path, monkeypatch):
    from ftlaunch.run import rank_logs

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    try:
        raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:29621")
    except RuntimeError as exc:
        rank_logs.record_error(tmp_path, exc, tmp_path / "train.log")
    # The launcher saw rank 1 gone after rank 0's record was written: still rank 1 first.
    ended = [{"rank": 1, "pid": 4118, "time": time.time() + 5, "exitcode": -9}]
    text = rank_logs.first_error_text(tmp_path, tmp_path / "train.log", 0.0, ended)
    assert text.startswith("First failure: rank 1 (pid 4118) was killed by SIGKILL"), text
    assert "Rank(s) 0 failed after it" in text
    assert rank_logs.first_error_text(tmp_path, tmp_path / "train.log", 0.0, [
        {**ended[0], "exitcode": 3}]).startswith("First failure: rank 1 (pid 4118) exited with code 3")


def test_a_full_disk_is_recognised_by_errno_and_by_torch_words(tmp_path):
    import errno

    from ftlaunch.run import diskfull

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.bin"))
    found = diskfull.detect(full, tmp_path)
    assert found["path"] == str(tmp_path / "x.bin") and found["free_bytes"] > 0
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = full
    assert diskfull.detect(wrapped, tmp_path)["path"] == str(tmp_path / "x.bin")
    # torch's words without an errno: a full disk only if this one is (nearly) full; here it
    # is not, so it stays an ordinary failure.
    assert diskfull.detect(RuntimeError("PytorchStreamWriter failed writing file data/0: "
                                        "file write failed"), tmp_path) is None
    assert diskfull.detect(RuntimeError("CUDA out of memory"), tmp_path) is None
