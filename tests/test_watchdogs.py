"""Watchdogs on real tiny trainings: a NaN/inf loss stops the run with the last good
weights checkpointed (exit 2); a run that stops making progress (a worker frozen with a
real SIGSTOP) is reported with each rank's last step, killed, and resumes (exit 3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FTLAUNCH, TINY_TRAIN
from ftlaunch import checkpoints, heartbeat, rank_logs

USER_ERROR, STALLED = 2, 3


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
    proc = subprocess.run([FTLAUNCH, *args, "--set", "logging_steps=1", "--output-dir",
                           str(run_dir)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == USER_ERROR, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.count("ftlaunch: error:") == 1
    message = proc.stderr[proc.stderr.index("ftlaunch: error:"):].strip()
    assert message.startswith("ftlaunch: error: The training loss became NaN or infinite")
    assert "\n" not in message and "--fresh --set learning_rate=" in message

    stop = json.loads((run_dir / "stopped.json").read_text())
    assert stop["why"] == "non-finite loss" and stop["update_skipped"] is True
    checkpoint = Path(stop["checkpoint"])
    assert checkpoints.verify(checkpoint)[0] is None, "the stop's checkpoint is complete"
    assert checkpoint.name == f"checkpoint-{stop['non_finite_step']}"
    assert _finite_adapter(checkpoint), "the checkpoint holds the weights from before the NaN"
    assert f"{checkpoint.name} holds the weights from just before it" in message
    assert not (run_dir / "adapter").exists(), "a run that went NaN is not 'finished'"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("loss") != row.get("loss") for row in rows), "the NaN is logged as NaN"


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _heartbeats(run_dir: Path, count: int) -> list[dict] | None:
    beats = heartbeat.read(run_dir)
    return beats if len(beats) >= count and all(b["step"] >= 4 for b in beats) else None


def _stall(tmp_path: Path, gpus: int, frozen_rank: int) -> tuple[str, Path, list[str]]:
    run_dir = tmp_path / "run"
    args = ["--model", "tiny", "--gpus", str(gpus), "--max-steps", "150", "--global-batch-size",
            "4", "--seq-len", "64", "--set", "logging_steps=10", "--set", "save_steps=3",
            "--stall-timeout", "8s", "--output-dir", str(run_dir)]
    launcher = subprocess.Popen([FTLAUNCH, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        beats = _wait_for(lambda: _heartbeats(run_dir, gpus), 300, "every rank's heartbeat")
        frozen = next(b for b in beats if b["rank"] == frozen_rank)
        os.kill(frozen["pid"], signal.SIGSTOP)  # frozen: no step, no thread, no answer
        out, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == STALLED, out
    for beat in beats:  # nothing of the job is left, not even the frozen process
        with pytest.raises(ProcessLookupError):
            for _ in range(50):
                os.kill(beat["pid"], 0)
                time.sleep(0.1)
    return out, run_dir, args


def test_a_frozen_worker_is_reported_killed_and_the_run_resumes(tmp_path):
    out, run_dir, args = _stall(tmp_path, gpus=1, frozen_rank=0)
    report = next(line for line in out.splitlines() if line.startswith("Stalled:"))
    assert "No rank made progress for" in report and "--stall-timeout 8 s" in report
    assert "rank 0 at step" in report and "process stopped" in report
    assert "re-run the same command to resume from checkpoint-" in report
    recorded = json.loads((run_dir / heartbeat.STALL_FILE).read_text())
    assert [r["rank"] for r in recorded["ranks"]] == [0]
    newest = checkpoints.scan(run_dir / "checkpoints").newest
    assert newest is not None and f"resume from {newest.path.name}" in report

    again = subprocess.run([FTLAUNCH, *args], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming {run_dir} from {newest.path.name}" in again.stdout
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert not (run_dir / heartbeat.STALL_FILE).exists()


@pytest.mark.slow
def test_a_frozen_rank_of_two_is_named(tmp_path):
    """Rank 1 frozen: rank 0 waits in the step's all-reduce (gloo), so neither moves; the
    report names both ranks' steps and that rank 1's process is stopped, and rank 0's
    Python stack (it could still answer SIGUSR1) is in train.log."""
    out, run_dir, _ = _stall(tmp_path, gpus=2, frozen_rank=1)
    report = next(line for line in out.splitlines() if line.startswith("Stalled:"))
    assert "rank 0 at step" in report and "rank 1 at step" in report
    assert "process stopped" in report.split("rank 1 at step")[1]
    log = (run_dir / "train.log").read_text()
    assert "Thread 0x" in log or "Current thread" in log, "rank 0's stack was dumped"
    assert (run_dir / rank_logs.DIRECTORY / "rank-1.log").is_file()
