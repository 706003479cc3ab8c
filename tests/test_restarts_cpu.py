"""In-job restarts on real tiny trainings: a worker that dies (a real SIGKILL from outside,
or one it sends itself at a chosen step), a worker that freezes (SIGSTOP: the stall
watch ends it), and a worker that fails at the same step every time. Faults at a chosen
step come from tests/faults/sitecustomize.py, which the workers load from PYTHONPATH
(jobs.fault_env). The restart of FSDP-QLoRA and ZeRO-3 QLoRA jobs is in
test_strategies_cpu; of two nodes, in test_multinode_cpu."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import FTLAUNCH, TINY_TRAIN, cores, run_ftlaunch, wait_for
from jobs import assert_same_adapter, fault_env, restart_lines
from ftlaunch.run import heartbeat

def _restarts(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "run.yaml").read_text())["restarts"]


def _finished_at(run_dir: Path, step: int) -> None:
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert json.loads((run_dir / "ranks" / "rank-0.json").read_text())["global_step"] == step
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "each logged step once, in order, across the restart"


def test_a_worker_killed_once_is_restarted_and_trains_what_an_uninterrupted_run_does(
        tiny_run, tmp_path):
    """One process (the launcher starts it itself, without accelerate launch): it SIGKILLs
    itself at step 8, after checkpoint-6; the launcher starts it again from there, and
    the adapter equals the uninterrupted run's tensor for tensor."""
    _, reference = tiny_run
    run_dir = tmp_path / "run"
    proc = run_ftlaunch(*TINY_TRAIN, "--output-dir", str(run_dir),
                        env=fault_env("sigkill", 8, once=tmp_path / "killed"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    [line] = restart_lines(out)
    assert line.startswith("ftlaunch: restart 1 of 3 in 2 s: rank 0 (pid "), line
    assert "was killed by SIGKILL" in line and line.endswith("starts again from checkpoint-6."), line
    [event] = _restarts(run_dir)["done"]
    assert (event["rank"], event["from"], event["step"]) == (0, "checkpoint-6", 7), event
    assert "Restarted after 1 failure(s), each time from a complete checkpoint:" in out
    _finished_at(run_dir, 12)
    assert_same_adapter(run_dir, reference)


def test_a_failure_at_the_same_step_is_restarted_once_then_ends_the_job(tmp_path):
    """Rank 0 raises once its heartbeat reaches step 5, in every launch. (--max-restarts 0,
    today's behaviour without restarts: test_failures_cpu's killed rank.)"""
    run_dir = tmp_path / "run"
    proc = run_ftlaunch("--model", "tiny", "--gpus", "1", "--global-batch-size", "4",
                        "--seq-len", "64", "--max-steps", "8", "--set", "logging_steps=1",
                        "--set", "save_steps=3", "--output-dir", str(run_dir),
                        env=fault_env("raise", 5))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    [line] = restart_lines(out)
    assert ("rank 0 failed with RuntimeError: injected fault at step 5, after step 4; every "
            "worker starts again from checkpoint-3.") in line, line
    assert ("ftlaunch: not restarted: it failed again after step 4, as before restart 1: a "
            "failure that repeats at the same step is not healed by restarting") in out, out
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("First error: rank 0 failed with RuntimeError: injected fault at "
                           "step 5"), last
    assert last.endswith("re-run the same command to resume from checkpoint-3."), last
    assert len(_restarts(run_dir)["done"]) == 1
    assert not (run_dir / "adapter").exists()


def test_a_frozen_worker_is_ended_by_the_stall_watch_and_restarted(tiny_run, tmp_path):
    """SIGSTOP at step 8: no heartbeat for --stall-timeout; the launcher kills the job and
    starts it again from checkpoint-6 instead of ending with exit 3."""
    _, reference = tiny_run
    run_dir = tmp_path / "run"
    proc = run_ftlaunch(*TINY_TRAIN, "--stall-timeout", "6s", "--output-dir", str(run_dir),
                        env=fault_env("sigstop", 8, once=tmp_path / "frozen"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    [line] = restart_lines(out)
    assert "no rank made progress for " in line and "(a hung collective or a stuck device" in line
    assert line.endswith("starts again from checkpoint-6."), line
    assert not (run_dir / heartbeat.STALL_FILE).exists()
    _finished_at(run_dir, 12)
    assert_same_adapter(run_dir, reference)


@pytest.mark.slow
@pytest.mark.skipif(cores() < 2, reason="two CPU workers need two cores")
def test_a_rank_killed_from_outside_restarts_every_rank_and_the_job_finishes(tmp_path):
    """`--gpus 2`: a real SIGKILL to rank 1 once a checkpoint is complete. Rank 0 fails
    in its next collective; both are started again from the newest complete checkpoint;
    the job ends by itself with exit 0 and the adapter of an uninterrupted run."""
    args = ["--model", "tiny", "--gpus", "2", "--global-batch-size", "4", "--seq-len", "64",
            "--max-steps", "16", "--set", "logging_steps=1", "--set", "save_steps=3"]
    reference = tmp_path / "reference"
    proc = run_ftlaunch(*args, "--output-dir", str(reference))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    run_dir = tmp_path / "run"
    launcher = subprocess.Popen([FTLAUNCH, *args, "--output-dir", str(run_dir)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def rank_1_after_a_checkpoint():
            done = (run_dir / "checkpoints" / "checkpoint-6" / "ftlaunch-checkpoint.json").exists()
            beats = {b["rank"]: b for b in heartbeat.read(run_dir)}
            return beats.get(1) if done and 1 in beats else None

        killed = wait_for(rank_1_after_a_checkpoint, launcher, 300, "checkpoint-6", poll=0.02)
        os.kill(killed["pid"], signal.SIGKILL)
        out, _ = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            for child in psutil.Process(launcher.pid).children(recursive=True):
                child.kill()
            launcher.kill()
    assert launcher.returncode == 0, out
    [line] = restart_lines(out)
    assert line.startswith(f"ftlaunch: restart 1 of 3 in 2 s: rank 1 (pid {killed['pid']}) "
                           "was killed by SIGKILL"), line
    [event] = _restarts(run_dir)["done"]
    assert event["rank"] == 1 and line.endswith(f"starts again from {event['from']}."), event
    assert int(event["from"].split("-")[1]) >= 6
    assert f"restart 1: rank 1 (pid {killed['pid']}) was killed by SIGKILL" in out
    _finished_at(run_dir, 16)
    reports = sorted((run_dir / "ranks").glob("rank-*.json"))
    assert len(reports) == 2, "both ranks finished the restarted job"
    assert_same_adapter(run_dir, reference)
