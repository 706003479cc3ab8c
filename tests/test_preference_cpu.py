"""DPO and KTO through the whole launcher, on CPU processes with the tiny model: the
SFT -> DPO chain on chat pairs starts from an SFT run directory and trains against that
adapter frozen (FSDP QLoRA on two processes, the sharded engine the planner picks for
big models); killed by a power loss, that run resumes bitwise; string pairs train on one
process, stopped by SIGTERM, and resume on two (DDP). KTO goes the same way from the
SFT adapter on the chat pairs (unpaired) and resumes bitwise after a power loss; labelled
string completions train KTO on two processes with precomputed reference log-probs."""

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
SHARDED = ("--gpus", "2", "--engine", "fsdp", "--method", "qlora")
CHAIN = (*RUN, *SHARDED, "--eval-split", "0.25")  # 12 of the 48 pairs held out
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
    proc = run_ftlaunch(*CHAIN, "--data", str(pairs["chat"]), "--adapter", str(sft_run),
                        "--output-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run_dir, proc.stdout


def _bench_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_then_dpo_trains_against_the_frozen_sft_adapter(chain, sft_run):
    import torch
    from safetensors.torch import load_file

    run_dir, out = chain
    assert "objective  DPO on preference pairs" in out
    record = yaml.safe_load((run_dir / "run.yaml").read_text())
    strategy = record["strategy"]
    assert strategy["objective"] == "dpo" and strategy["start_adapter"]
    assert (strategy["engine"], strategy["method"], strategy["world_size"]) == ("fsdp", "qlora", 2)
    assert record["data"]["format"] == "chat_preference"
    # The run keeps its own copy of the starting adapter: the SFT run's, byte for byte.
    start_weights = load_file(str(run_dir / "start-adapter" / "adapter_model.safetensors"))
    sft_weights = adapter(sft_run)
    assert all(torch.equal(start_weights[k], sft_weights[k]) for k in sft_weights)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in sft_weights.items())

    rows = [r for r in _rows(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    # The policy starts as the reference, the SFT adapter: its first rewards are 0 up to
    # the 4-bit base's rounding (bitsandbytes computes the reference pass, without
    # gradients, a little differently on CPU). Against the base with the adapter
    # disabled they would be beta * (log p_sft - log p_base): over 10 times more in any batch.
    first = rows[0]
    assert abs(first["rewards/chosen"]) < 1e-3 and abs(first["rewards/rejected"]) < 1e-3
    assert first["loss"] == pytest.approx(0.693147, abs=1e-3)  # -log sigmoid(0)
    shift = _sft_log_prob_shift(run_dir, sft_run)
    assert all(s > 0 for s in shift) or all(s < 0 for s in shift), shift
    weakest_batch = sum(sorted(abs(s) for s in shift)[:4]) / 4  # 4 pairs a step
    assert 0.1 * weakest_batch > 1e-2, shift  # beta 0.1
    assert any(r["rewards/margins"] != 0.0 for r in rows[1:])
    assert {"rewards/accuracies", "logps/chosen", "logps/rejected"} <= set(rows[-1])
    assert (run_dir / "loss.png").stat().st_size > 0
    # The run's adapter is the trained policy alone, not the frozen reference beside it.
    assert not (run_dir / "adapter" / "ref").exists()
    trained = adapter(run_dir)
    assert sorted(trained) == sorted(sft_weights)
    assert any(not torch.equal(trained[k], sft_weights[k]) for k in trained)

    # Evaluated on the held-out pairs at the checkpoints' steps, and bench/dpo_pairs.py's
    # figure (docs/BENCHMARKS.md) measured on them.
    evals = [r for r in _rows(run_dir) if "eval_rewards/accuracies" in r]
    assert [r["step"] for r in evals] == [3, 6, 8] and "eval_perplexity" not in evals[0]
    assert "Reward accuracy on held-out pairs:" in out
    figure = _bench_script("dpo_pairs").main(run_dir)
    assert figure["pairs"] == 12
    for label in ("base", "start adapter (before DPO)", "trained adapter (after DPO)"):
        assert 0 <= figure[label]["preferred"] <= 1

    proc = run_ftlaunch("generate", str(run_dir), "--prompt", "What is 2 + 2?",
                        "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr  # tiny's random weights say little


def _sft_log_prob_shift(run_dir, sft_run) -> list[float]:
    """log p(chosen | prompt) with the SFT adapter minus without it, for every training
    pair of the run (its data cache), on the full-precision base (bench/dpo_pairs.py's
    measure)."""
    import torch
    from peft import PeftModel

    from ftlaunch.data import cache as data_cache
    from ftlaunch.models.load import load_base_model
    from ftlaunch.run import record as run_record

    record = run_record.load(run_dir)
    pairs, _ = data_cache.load(run_dir / data_cache.DIRECTORY, record.data.cache["fingerprint"])
    measure = _bench_script("dpo_pairs").completion_logps
    base = load_base_model(record.model, torch.float32, seed=record.seed).eval()
    without = measure(base, pairs, "chosen")
    tuned = PeftModel.from_pretrained(base, str(sft_run / "adapter")).eval()
    return [w - wo for w, wo in zip(measure(tuned, pairs, "chosen"), without)]


def test_a_dpo_run_killed_by_sigkill_resumes_bitwise(chain, pairs, sft_run, tmp_path):
    """A power loss (every process of the job SIGKILLed at once) after checkpoint-3:
    the same command resumes and ends as the uninterrupted run did, losses, rewards and
    adapter bitwise. (FSDP's whole-job SIGKILL; tests/test_strategies_cpu.py stops each
    engine with SIGTERM and a killed rank.)"""
    reference, _ = chain
    _power_loss_then_resume((*CHAIN, "--data", str(pairs["chat"]), "--adapter", str(sft_run)),
                            tmp_path, reference,
                            ("rewards/chosen", "rewards/rejected", "eval_rewards/accuracies"))


def _power_loss_then_resume(args, tmp_path, reference, metrics) -> None:
    """Every process of the job SIGKILLed at once after checkpoint-3: the same command
    resumes from it and ends as `reference` did, losses, `metrics` and adapter bitwise."""
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    args = (*args, "--output-dir", str(run_dir))
    launcher = start(*args, log=log)
    assert wait(lambda: logged_steps(run_dir) >= 5, launcher, poll=0.01), log.read_text()
    power_loss(launcher)
    assert (run_dir / "checkpoints" / "checkpoint-3").is_dir()
    resumed = run_ftlaunch(*args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout and "checkpoint-3" in resumed.stdout
    assert losses(run_dir) == losses(reference)
    assert_same_adapter(run_dir, reference)
    for key in metrics:
        assert [r.get(key) for r in _rows(run_dir)] == [r.get(key) for r in _rows(reference)]


def test_string_pairs_train_on_one_process_and_resume_on_two(pairs, tmp_path):
    """With the reference log-probs precomputed: by one process, then by two on resume."""
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    args = (*RUN, "--data", str(pairs["plain"]), "--output-dir", str(run_dir),
            "--set", "precompute_ref_log_probs=true")
    launcher = start(*args, "--gpus", "1", log=log)
    assert wait(lambda: logged_steps(run_dir) >= 4, launcher, poll=0.02), log.read_text()
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=120) == PREEMPTED_EXIT, log.read_text()[-3000:]
    step = json.loads((run_dir / "stopped.json").read_text())["step"]
    manifest = json.loads((run_dir / "checkpoints" / f"checkpoint-{step}" /
                           "ftlaunch-checkpoint.json").read_text())
    assert manifest["world_size"] == 1 and manifest["samples_seen"] == 4 * step
    record = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert record["data"]["format"] == "preference" and record["strategy"]["world_size"] == 1

    resumed = run_ftlaunch("resume", str(run_dir), "--gpus", "2")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (f"checkpoint-{step} was written by 1 process (micro-batch 4 x accumulation 1); "
            "resuming on 2 (micro-batch 2 x accumulation 1)") in resumed.stdout
    ranks = [json.loads((run_dir / "ranks" / f"rank-{i}.json").read_text()) for i in (0, 1)]
    assert all(r["world_size"] == 2 and r["global_step"] == 8 for r in ranks)
    rows = [r for r in _rows(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all("rewards/margins" in r for r in rows)


# The chat pairs, each two examples: 12 pairs held out (24 examples), 72 examples trained.
KTO = (*CHAIN, "--objective", "kto")


def test_sft_then_kto_on_pairs_resumes_bitwise_after_a_power_loss(pairs, sft_run,
                                                                   tmp_path_factory):
    """KTO from the SFT run's adapter (frozen as its reference) on the pairs unpaired, FSDP
    QLoRA on two processes, micro-batch 2 (the KL estimate's least): the uninterrupted run,
    and a power loss after checkpoint-3 that the same command resumes, bitwise."""
    reference = tmp_path_factory.mktemp("kto") / "run"
    common = (*KTO, "--data", str(pairs["chat"]), "--adapter", str(sft_run))
    proc = run_ftlaunch(*common, "--output-dir", str(reference))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "objective  KTO on completions labelled desirable or not" in proc.stdout
    record = yaml.safe_load((reference / "run.yaml").read_text())
    assert record["strategy"]["objective"] == "kto" and record["strategy"]["start_adapter"]
    assert record["data"]["kind"] == "chat_unpaired"
    assert record["trainer"]["per_device_train_batch_size"] == 2
    rows = [r for r in _rows(reference) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    # The policy starts as its reference, the SFT adapter: rewards 0 up to 4-bit rounding,
    # and the loss 1 - sigmoid(0) = 0.5 whatever the label.
    assert abs(rows[0].get("rewards/chosen", 0)) < 1e-3
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-3)
    assert all("kl" in r for r in rows) and any(r.get("rewards/margins") for r in rows[1:])
    evals = [r for r in _rows(reference) if "eval_kl" in r]
    assert [r["step"] for r in evals] == [3, 6, 8]
    assert "Reward margin on held-out examples:" in proc.stdout
    assert not (reference / "adapter" / "ref").exists()
    assert sorted(adapter(reference)) == sorted(adapter(sft_run))
    from ftlaunch.data import cache as data_cache

    train, held = data_cache.load(reference / data_cache.DIRECTORY,
                                  record["data"]["cache"]["fingerprint"])
    # 12 pairs held out, both halves (how the pairs are split is test_kto_data.py's).
    assert (len(train), len(held)) == (72, 24) and sum(held["label"]) == 12

    _power_loss_then_resume(common, tmp_path_factory.mktemp("kto-killed"), reference,
                            ("kl", "rewards/chosen", "rewards/rejected", "eval_rewards/margins"))


def test_labelled_string_completions_train_kto_with_precomputed_reference(pairs, tmp_path):
    """{prompt, completion, label} rows are KTO's without --objective, here on two
    processes with the reference log-probs computed once before training (rank 0 writes
    them into the run for both ranks); the progress line and metrics.jsonl carry its
    rewards and KL estimate."""
    data = tmp_path / "labelled.jsonl"
    plain = [json.loads(line) for line in pairs["plain"].read_text().splitlines()]
    data.write_text("".join(
        json.dumps({"prompt": r["prompt"], "label": i % 3 != 0,
                    "completion": r["chosen"] if i % 3 != 0 else r["rejected"]}) + "\n"
        for i, r in enumerate(plain)))
    run_dir = tmp_path / "run"
    proc = run_ftlaunch(*RUN, "--data", str(data), "--gpus", "2", "--output-dir", str(run_dir),
                        "--set", "precompute_ref_log_probs=true")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " kl " in proc.stdout and "Reward margin on training batches:" in proc.stdout
    assert "reference log-probs computed once before training" in proc.stdout
    assert [p.name.split("-")[0] for p in (run_dir / "reference-logps").iterdir()] == ["train"]
    record = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert (record["strategy"]["objective"], record["data"]["kind"]) == ("kto", "unpaired")
    assert record["strategy"]["world_size"] == 2
    rows = [r for r in _rows(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9)) and all("kl" in r for r in rows)
    preview = run_ftlaunch("data", "preview", "--model", "tiny", "--data", str(data))
    assert preview.returncode == 0, preview.stderr
    assert "(undesirable)" in preview.stdout and "completion, desirable or not (KTO)" in \
        preview.stdout
