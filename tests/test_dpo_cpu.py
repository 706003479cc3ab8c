"""DPO through the whole launcher, on CPU processes with the tiny model: both preference
formats train (chat pairs on one process, string pairs on two), the SFT -> DPO chain
starts from an SFT run directory and trains against that adapter frozen, a DPO run
killed with SIGKILL resumes bitwise, and one stopped on two processes resumes on one."""

from __future__ import annotations

import json
import signal

import pytest
import yaml

from conftest import run_ftlaunch
from ftlaunch.data import demo
from jobs import adapter, assert_same_adapter, losses
from jobs import logged_steps, power_loss, start, wait

pytestmark = pytest.mark.slow

# 8 steps of 4 pairs, a checkpoint every 3 steps, every step logged.
RUN = ("--model", "tiny", "--max-steps", "8", "--global-batch-size", "4", "--seq-len", "64",
       "--set", "logging_steps=1", "--set", "save_steps=3", "--set", "learning_rate=5e-3")
PREEMPTED_EXIT = 75


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict:
    """The demo's arithmetic pairs as whole conversations (the implicit-prompt chat
    format), and as plain strings."""
    folder = tmp_path_factory.mktemp("pairs")
    chat, plain = folder / "chat.jsonl", folder / "plain.jsonl"
    rows = demo.preference_pairs(48, seed=3)
    chat.write_text("".join(json.dumps({"chosen": r["prompt"] + r["chosen"],
                                        "rejected": r["prompt"] + r["rejected"]}) + "\n"
                            for r in rows))
    plain.write_text("".join(json.dumps({"prompt": r["prompt"][-1]["content"] + "\nA:",
                                         "chosen": " " + r["chosen"][0]["content"],
                                         "rejected": " " + r["rejected"][0]["content"]}) + "\n"
                             for r in rows))
    return {"chat": chat, "plain": plain}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    proc = run_ftlaunch("--model", "tiny", "--max-steps", "4", "--global-batch-size", "4",
                        "--seq-len", "64", "--set", "learning_rate=2e-2",
                        "--output-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run_dir


@pytest.fixture(scope="module")
def chain(tmp_path_factory, pairs, sft_run):
    """DPO from the SFT run's adapter, uninterrupted: the reference for the resume."""
    run_dir = tmp_path_factory.mktemp("dpo") / "run"
    proc = run_ftlaunch(*RUN, "--data", str(pairs["chat"]), "--adapter", str(sft_run),
                        "--output-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run_dir, proc.stdout


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_then_dpo_trains_against_the_frozen_sft_adapter(chain, sft_run):
    import torch
    from safetensors.torch import load_file

    run_dir, out = chain
    assert "objective  DPO on preference pairs" in out
    record = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert record["strategy"]["objective"] == "dpo" and record["strategy"]["start_adapter"]
    assert record["data"]["format"] == "chat_preference"
    # The run keeps its own copy of the starting adapter: the SFT run's, byte for byte.
    start_weights = load_file(str(run_dir / "start-adapter" / "adapter_model.safetensors"))
    sft_weights = adapter(sft_run)
    assert all(torch.equal(start_weights[k], sft_weights[k]) for k in sft_weights)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in sft_weights.items())

    rows = [r for r in _rows(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    # The policy starts as the reference: the SFT adapter. Against the base with the
    # adapter disabled its rewards would be beta * (log p_sft - log p_base), not 0.
    first = rows[0]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)  # -log sigmoid(0)
    assert any(r["rewards/margins"] != 0.0 for r in rows[1:])
    assert {"rewards/accuracies", "logps/chosen", "logps/rejected"} <= set(rows[-1])
    assert (run_dir / "loss.png").stat().st_size > 0
    # The run's adapter is the trained policy alone, not the frozen reference beside it.
    assert not (run_dir / "adapter" / "ref").exists()
    trained = adapter(run_dir)
    assert sorted(trained) == sorted(sft_weights)
    assert any(not torch.equal(trained[k], sft_weights[k]) for k in trained)

    proc = run_ftlaunch("generate", str(run_dir), "--prompt", "What is 2 + 2?",
                        "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr  # tiny's random weights say little


def test_a_dpo_run_killed_by_sigkill_resumes_bitwise(chain, pairs, sft_run, tmp_path):
    reference, _ = chain
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    args = (*RUN, "--data", str(pairs["chat"]), "--adapter", str(sft_run),
            "--output-dir", str(run_dir))
    launcher = start(*args, log=log)
    assert wait(lambda: logged_steps(run_dir) >= 5, launcher, poll=0.01), log.read_text()
    power_loss(launcher)
    assert (run_dir / "checkpoints" / "checkpoint-3").is_dir()
    resumed = run_ftlaunch(*args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout and "checkpoint-3" in resumed.stdout
    assert losses(run_dir) == losses(reference)
    assert_same_adapter(run_dir, reference)
    for key in ("rewards/chosen", "rewards/rejected"):
        assert [r.get(key) for r in _rows(run_dir)] == [r.get(key) for r in _rows(reference)]


def test_string_pairs_train_on_two_processes_and_resume_on_one(pairs, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    args = (*RUN, "--data", str(pairs["plain"]), "--output-dir", str(run_dir))
    launcher = start(*args, "--gpus", "2", log=log)
    assert wait(lambda: logged_steps(run_dir) >= 4, launcher, poll=0.02), log.read_text()
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=120) == PREEMPTED_EXIT, log.read_text()[-3000:]
    step = json.loads((run_dir / "stopped.json").read_text())["step"]
    manifest = json.loads((run_dir / "checkpoints" / f"checkpoint-{step}" /
                           "ftlaunch-checkpoint.json").read_text())
    assert manifest["world_size"] == 2 and manifest["samples_seen"] == 4 * step
    record = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert record["data"]["format"] == "preference" and record["strategy"]["world_size"] == 2

    resumed = run_ftlaunch("resume", str(run_dir), "--gpus", "1")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (f"checkpoint-{step} was written by 2 processes (micro-batch 2 x accumulation 1); "
            "resuming on 1 (micro-batch 4 x accumulation 1)") in resumed.stdout
    assert json.loads((run_dir / "ranks" / "rank-0.json").read_text())["world_size"] == 1
    rows = [r for r in _rows(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all("rewards/margins" in r for r in rows)
