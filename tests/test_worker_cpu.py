"""Tiny-model training on CPU through the real CLI, accelerate launch and TRL."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import yaml

from conftest import TINY_TRAIN, run_ftlaunch
from ftlaunch.resources import demo_data_path

TRAIN = TINY_TRAIN  # what the session's tiny_run was trained with (tests/conftest.py)


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_run_writes_the_run_directory_contract(tiny_run):
    proc, run_dir = tiny_run
    assert "step 12/12" in proc.stdout  # the workers' output is streamed through
    assert "Done." in proc.stdout
    record = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert record["plan"]["engine"] == "cpu"
    assert record["plan"]["num_processes"] == 1
    assert record["plan"]["global_batch_size"] == 4
    assert record["data"]["fingerprint"] == "sha256:" + hashlib.sha256(
        demo_data_path().read_bytes()).hexdigest()
    assert record["versions"]["torch"] and record["versions"]["trl"]
    assert record["command"][:2] == ["--model", "tiny"]
    # The last step writes adapter/, not a checkpoint (a resume from it would train a
    # step past the end); every checkpoint there is complete, with its marker.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-6"]
    assert (run_dir / "checkpoints" / "checkpoint-6" / "ftlaunch-checkpoint.json").is_file()
    rank = json.loads((run_dir / "ranks" / "rank-0.json").read_text())
    assert rank["world_size"] == 1 and rank["global_step"] == 12


def test_metrics_log_every_step_and_the_loss_falls(tiny_run):
    _, run_dir = tiny_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert all(r["loss"] > 0 and "learning_rate" in r and "grad_norm" in r for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_adapter_loads_with_plain_peft_and_was_trained(tiny_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, run_dir = tiny_run
    record = yaml.safe_load((run_dir / "run.yaml").read_text())
    base = AutoModelForCausalLM.from_pretrained(record["model"]["load_from"])
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b, "the adapter has no LoRA weights"
    # LoRA B starts at zero; a trained adapter has moved it.
    assert any(torch.count_nonzero(p) > 0 for p in lora_b)
    assert (run_dir / "adapter" / "tokenizer_config.json").is_file()


def test_rerunning_a_finished_run_trains_nothing(tiny_run):
    _, run_dir = tiny_run
    before = _tree_digest(run_dir / "adapter"), (run_dir / "metrics.jsonl").read_text()
    proc = run_ftlaunch(*TRAIN, "--output-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert "already finished" in proc.stdout
    assert (_tree_digest(run_dir / "adapter"), (run_dir / "metrics.jsonl").read_text()) == before


def test_changed_settings_are_refused_and_the_run_is_untouched(tiny_run):
    _, run_dir = tiny_run
    before = _tree_digest(run_dir)
    args = [a if a != "128" else "256" for a in TRAIN]  # --seq-len 256
    proc = run_ftlaunch(*args, "--output-dir", str(run_dir))
    assert proc.returncode == 2
    assert "seq_len" in proc.stderr and "--fresh" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _tree_digest(run_dir) == before


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tiny_run, tmp_path):
    _, finished = tiny_run
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    # As if stopped between step 6 and 12: no adapter, no later checkpoint.
    shutil.rmtree(run_dir / "adapter")
    proc = run_ftlaunch(*TRAIN, "--output-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resuming {run_dir} from checkpoint-6" in proc.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]  # no step logged twice
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert json.loads((run_dir / "ranks" / "rank-0.json").read_text())["global_step"] == 12


def test_fresh_moves_the_old_run_aside(tiny_run, tmp_path):
    _, finished = tiny_run
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    digest = _tree_digest(run_dir)
    proc = run_ftlaunch("--model", "tiny", "--gpus", "1", "--max-steps", "2",
                        "--global-batch-size", "2", "--seq-len", "64", "--fresh",
                        "--output-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    moved = list(tmp_path.glob("run.old-*"))
    assert len(moved) == 1 and _tree_digest(moved[0]) == digest
    assert json.loads((run_dir / "ranks" / "rank-0.json").read_text())["global_step"] == 2


def test_a_failing_training_fails_the_launcher(tmp_path, tiny_run):
    # A model folder whose config and tokenizer read fine, but whose weights are cut in
    # half: only the worker, loading them, finds out.
    _, finished = tiny_run
    record = yaml.safe_load((finished / "run.yaml").read_text())
    model = shutil.copytree(record["model"]["load_from"], tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = run_ftlaunch("--model", str(model), "--gpus", "1", "--max-steps", "2",
                        "--output-dir", str(tmp_path / "run"))
    assert proc.returncode != 0
    assert not (tmp_path / "run" / "adapter").exists()
    # The failure is named at the end, from the rank's own record of it.
    error = json.loads((tmp_path / "run" / "ranks" / "error-0.json").read_text())
    assert error["rank"] == 0 and error["log"] == str(tmp_path / "run" / "train.log")
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"First error: rank 0 failed with {error['type']}")
    # Restarted once (a file could have been cut by a transient fault), then stopped: it
    # failed again before the first step, where it failed before.
    assert proc.stdout.count("ftlaunch: restart ") == 1, proc.stdout
    assert "ftlaunch: not restarted: it failed again after step 0" in proc.stdout
