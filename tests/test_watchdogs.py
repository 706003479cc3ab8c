"""Watchdogs on real tiny trainings: a NaN/inf loss stops the run with the last good
weights checkpointed (exit 2); a run that stops making progress (a worker frozen with a
real SIGSTOP) is killed and restarted in the job, and when it freezes again after the
same step it is reported with each rank's last step and the job ends (exit 3); a
re-run resumes. With --max-restarts 0 the first stall ends the job."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import psutil

from conftest import FTLAUNCH, TINY_TRAIN, assert_user_error, cores, run_ftlaunch, wait_for
from jobs import fault_env, restart_lines
from ftlaunch.run import checkpoints
from ftlaunch.run import heartbeat
from ftlaunch.run import directory as rundir

STALLED = 3


def _finite_adapter(checkpoint: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "adapter_model.safetensors"))
    return all(bool(torch.isfinite(t).all()) for t in weights.values())


def test_a_nan_loss_stops_with_the_last_good_weights_and_exit_2(tmp_path):
    # A learning rate of 1e30 sends the LoRA weights to ~1e30 at the first real update;
    # the next forward overflows and the loss and gradients become NaN.
    run_dir = tmp_path / "run"
    args = list(TINY_TRAIN)
    args[args.index("learning_rate=5e-3")] = "learning_rate=1e30"
    args[args.index("logging_steps=2")] = "logging_steps=1"  # the NaN step is logged too
    proc = subprocess.run([FTLAUNCH, *args, "--output-dir", str(run_dir)], capture_output=True,
                          text=True, timeout=600)
    message = assert_user_error(proc, "The training loss became NaN or infinite",
                                "--fresh --set learning_rate=")

    stop = json.loads((run_dir / "stopped.json").read_text())
    assert stop["why"] == "non-finite loss" and stop["update_skipped"] is True
    checkpoint = Path(stop["checkpoint"])
    assert checkpoints.verify(checkpoint)[0] is None, "the stop's checkpoint is complete"
    assert checkpoint.name == f"checkpoint-{stop['non_finite_step']}"
    # Only that checkpoint, no staging area left behind.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [checkpoint.name]
    assert _finite_adapter(checkpoint), "the checkpoint holds the weights from before the NaN"
    assert f"{checkpoint.name} holds the weights from just before it" in message
    assert not (run_dir / "adapter").exists(), "a run that went NaN is not 'finished'"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("loss") != row.get("loss") for row in rows), "the NaN is logged as NaN"


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _heartbeats(run_dir: Path, count: int) -> list[dict] | None:
    beats = heartbeat.read(run_dir)
    return beats if len(beats) >= count and all(b["step"] >= 4 for b in beats) else None


# Steps enough that the run cannot end by itself before it is frozen (max_steps is not part
# of a run's identity: the resume asks for a few steps more than the last checkpoint).
_ENDLESS = "100000"


def _stall(tmp_path: Path, gpus: int, frozen_rank: int) -> tuple[str, Path, list[str]]:
    run_dir = tmp_path / "run"
    args = ["--model", "tiny", "--gpus", str(gpus), "--global-batch-size", "4", "--seq-len",
            "64", "--set", "logging_steps=1", "--set", "save_steps=3", "--stall-timeout", "8s",
            "--max-restarts", "0", "--output-dir", str(run_dir)]
    launcher = subprocess.Popen([FTLAUNCH, *args, "--max-steps", _ENDLESS],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    beats: list[dict] = []
    try:
        beats = wait_for(lambda: _heartbeats(run_dir, gpus), launcher, 300,
                          "every rank's heartbeat")
        frozen = next(b for b in beats if b["rank"] == frozen_rank)
        os.kill(frozen["pid"], signal.SIGSTOP)  # frozen: no step, no thread, no answer
        out, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for beat in beats:  # whatever happened, nothing of the job outlives the test
            if not _gone(beat["pid"]):
                os.kill(beat["pid"], signal.SIGKILL)
    assert launcher.returncode == STALLED, out
    return out, run_dir, args


def _assert_all_gone(run_dir: Path) -> None:
    """The launcher killed every worker, the frozen one too (a zombie counts as gone)."""
    pids = [b["pid"] for b in heartbeat.read(run_dir)]
    deadline = time.monotonic() + 5
    while not all(map(_gone, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(map(_gone, pids)), pids


def test_a_frozen_worker_is_restarted_then_reported_killed_and_the_run_resumes(tmp_path):
    """The worker freezes itself (a real SIGSTOP) once its heartbeat reaches step 5, in
    every launch. The stall watch kills it and the launcher restarts it from
    checkpoint-3; frozen again after the same step, the job is stopped with exit 3 and
    where it was. The same command, without the fault, resumes and finishes."""
    run_dir = tmp_path / "run"
    args = ["--model", "tiny", "--gpus", "1", "--global-batch-size", "4", "--seq-len", "64",
            "--set", "logging_steps=1", "--set", "save_steps=3", "--stall-timeout", "8s",
            "--output-dir", str(run_dir)]
    proc = run_ftlaunch(*args, "--max-steps", _ENDLESS, env=fault_env("sigstop", 5))
    out = proc.stdout + proc.stderr
    assert proc.returncode == STALLED, out
    [line] = restart_lines(out)
    assert "no rank made progress for " in line and "(a hung collective or a stuck device" in line
    assert line.endswith("after step 4; every worker starts again from checkpoint-3."), line
    assert "ftlaunch: not restarted: it failed again after step 4, as before restart 1" in out
    _assert_all_gone(run_dir)
    recorded = json.loads((run_dir / heartbeat.STALL_FILE).read_text())
    assert recorded["timeout_s"] == 8 and recorded["seconds"] >= 8
    [rank] = recorded["ranks"]
    assert (rank["rank"], rank["process"], rank["step"]) == (0, "stopped", 4)
    report = next(line for line in out.splitlines() if line.startswith("Stalled:"))
    newest = checkpoints.scan(run_dir / "checkpoints").newest
    assert newest is not None and f"resume from {newest.path.name}" in report

    end = newest.step + 3
    again = subprocess.run([FTLAUNCH, *args, "--max-steps", str(end)], capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming {run_dir} from {newest.path.name}" in again.stdout
    # The stalled launch logged every step until the freeze: its rate times the rest.
    assert re.search(r"^time       ~.+ for the 3 steps left \(measured [\d,]+ tok/s over \d+ "
                     r"logged steps of this run's previous launch ", again.stdout, re.M), again.stdout
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    report0 = json.loads((run_dir / rundir.RANKS_DIR / "rank-0.json").read_text())
    assert report0["global_step"] == end
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "each logged step once, in order, across the resume"
    assert not (run_dir / heartbeat.STALL_FILE).exists()


@pytest.mark.slow
@pytest.mark.skipif(cores() < 2, reason="two CPU workers need two cores")
def test_a_frozen_rank_of_two_is_named(tmp_path):
    """Rank 1 frozen: rank 0 waits in the step's all-reduce (gloo), so neither moves; the
    report names both ranks' steps and that rank 1's process is stopped, and rank 0's
    Python stack (it could still answer SIGUSR1) is in train.log."""
    out, run_dir, _ = _stall(tmp_path, gpus=2, frozen_rank=1)
    _assert_all_gone(run_dir)
    recorded = json.loads((run_dir / heartbeat.STALL_FILE).read_text())
    states = {r["rank"]: r["process"] for r in recorded["ranks"]}
    assert states[1] == "stopped" and states[0] != "stopped", states
    log = (run_dir / "train.log").read_text()
    assert "Thread 0x" in log or "Current thread" in log, "rank 0's stack was dumped"
