"""In-job restarts of a one-process job on real tiny trainings (the launcher starts the
worker itself, without accelerate launch): a worker killed once, a worker that fails at
the same step every time, a worker that aborts after the adapter is written. Faults at a chosen
step come from tests/faults/sitecustomize.py, which the workers load from PYTHONPATH
(jobs.fault_env). Elsewhere: a rank of two killed mid-run, test_resume_cpu; every
engine's restart (DDP, FSDP, ZeRO-3, LoRA and QLoRA), test_strategies_cpu; a stall
restarted, then refused when it stalls again after the same step, test_watchdogs; two
nodes restarting together, test_multinode_cpu; --max-restarts 0, test_failures_cpu."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from conftest import TINY_TRAIN, run_ftlaunch
from jobs import assert_same_adapter, fault_env, restart_lines


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


def test_a_rank_that_aborts_after_the_adapter_is_complete_does_not_fail_the_run(tmp_path):
    """The adapter is written whole and renamed into place after the last collective; a
    rank that aborts in its interpreter's shutdown after that (seen once in a ZeRO-3 run)
    takes nothing away: the run is finished, exit 0, and nothing is restarted."""
    run_dir = tmp_path / "run"
    proc = run_ftlaunch("--model", "tiny", "--gpus", "1", "--global-batch-size", "4",
                        "--seq-len", "64", "--max-steps", "2", "--output-dir", str(run_dir),
                        env=fault_env("abort_at_exit", 0))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "ftlaunch: note: the workers exited with code 134 after the adapter was complete; " \
           "the run is finished" in out, out
    assert not restart_lines(out) and "Done. " in out
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
