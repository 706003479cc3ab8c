"""The shared SFT module on the tiny model: loss masking, packing, eval, QLoRA, recipes.

Masking and packing are checked on the batches the real SFTTrainer builds
(ftlaunch.worker.setup.build on a run directory the real CLI wrote), token id by token id.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from conftest import run_ftlaunch

CHATS = [
    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": f"Add {a} and {b}."},
                  {"role": "assistant", "content": f"{a + b}"}]}
    for a, b in [(3, 4), (10, 12), (7, 8), (20, 5), (6, 6), (9, 1), (2, 2), (8, 3)] * 4
]
PAIRS = [{"prompt": f"Reverse {w}:", "completion": f" {w[::-1]}"}
         for w in ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "house"] * 4]

BASE = ("--model", "tiny", "--gpus", "1", "--max-steps", "2", "--global-batch-size", "4",
        "--seq-len", "128", "--set", "logging_steps=1", "--set", "save_steps=2")


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _train(tmp_path: Path, name: str, data: Path, *extra: str) -> Path:
    run_dir = tmp_path / name
    proc = run_ftlaunch(*BASE, "--data", str(data), "--output-dir", str(run_dir), *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def _first_batch(run_dir: Path):
    from ftlaunch.worker.setup import build

    session = build(run_dir)
    batch = next(iter(session.trainer.get_train_dataloader()))
    return session, batch


def _labelled_spans(batch) -> list[list[int]]:
    """Runs of consecutive label-bearing positions, as lists of label token ids."""
    labels = batch["labels"].reshape(-1).tolist()
    spans, current = [], []
    for token in labels:
        if token == -100:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(token)
    if current:
        spans.append(current)
    return spans


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    return _train(tmp, "run", _write_jsonl(tmp / "chat.jsonl", CHATS), "--no-packing")


def test_assistant_only_loss_on_token_ids(chat_run):
    session, batch = _first_batch(chat_run)
    tokenizer = session.tokenizer
    eos = tokenizer.eos_token_id
    answers = {str(sum(map(int, c["messages"][1]["content"][4:-1].split(" and "))))
               for c in CHATS}
    spans = _labelled_spans(batch)
    assert spans, "nothing is trained"
    for span in spans:
        # Exactly the assistant's reply and its end-of-turn token: no system, no user text.
        assert span[-1] == eos
        assert tokenizer.decode(span[:-1]).strip() in answers
    # The spans hold the replies only; the prompts (system, user) are in the inputs but
    # carry no label.
    assert sum(len(s) for s in spans) == int((batch["labels"] != -100).sum())
    ids = batch["input_ids"].reshape(-1).tolist()
    assert "terse" in tokenizer.decode(ids) and "Add" in tokenizer.decode(ids)


def test_preview_agrees_with_the_trainer(chat_run):
    from ftlaunch.data import tokenize

    session, batch = _first_batch(chat_run)
    from ftlaunch.run import record as run_record

    tokenizer, _ = tokenize.load_tokenizer(run_record.load(chat_run).model, assistant_only=True)
    row = batch["input_ids"][0].tolist()
    labels = batch["labels"][0].tolist()
    # Find which example is in row 0 by matching its tokenization.
    for chat in CHATS:
        tokenized = tokenize.tokenize(tokenizer, chat, "conversational")
        n = len(tokenized.ids)
        if row[:n] == tokenized.ids:
            trained = [label != -100 for label in labels[:n]]
            # The trainer shifts nothing in labels (the model does): masks must match.
            assert trained == tokenized.trained
            return
    pytest.fail("row 0 of the batch is none of the examples")


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packed")
    return _train(tmp, "run", _write_jsonl(tmp / "chat.jsonl", CHATS))


def test_packing_fills_rows_and_restarts_positions(packed_run):
    record = yaml.safe_load((packed_run / "run.yaml").read_text())
    assert record["recipe"]["data"]["packing"] is True
    session, batch = _first_batch(packed_run)
    assert "attention_mask" not in batch  # padding-free: one row, no padding
    positions = batch["position_ids"].reshape(-1).tolist()
    starts = [i for i, p in enumerate(positions) if p == 0]
    assert len(starts) > 4, "several examples share the packed row"
    for a, b in zip(starts, starts[1:] + [len(positions)]):
        assert positions[a:b] == list(range(b - a))
    # The first token of every packed example is never a label (no loss across examples).
    labels = batch["labels"].reshape(-1).tolist()
    assert all(labels[s] == -100 for s in starts)


def test_packed_examples_do_not_attend_to_each_other(packed_run):
    """Logits of an example inside a packed row equal its logits alone."""
    import torch

    session, batch = _first_batch(packed_run)
    model = session.trainer.model.eval()
    ids = batch["input_ids"]
    positions = batch["position_ids"]
    starts = [i for i, p in enumerate(positions[0].tolist()) if p == 0]
    a, b = starts[1], starts[2]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions).logits[0, a:b]
        alone = model(input_ids=ids[:, a:b]).logits[0]
    assert torch.allclose(packed, alone, atol=1e-4), (packed - alone).abs().max()


def test_completion_only_loss(tmp_path):
    run_dir = _train(tmp_path, "run", _write_jsonl(tmp_path / "pairs.jsonl", PAIRS),
                     "--recipe", "completion", "--no-packing")
    record = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert record["data"]["kind"] == "prompt_completion"
    session, batch = _first_batch(run_dir)
    tokenizer = session.tokenizer
    completions = {p["completion"].strip() for p in PAIRS}
    for span in _labelled_spans(batch):
        assert span[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(span[:-1]).strip() in completions


def test_eval_split_logs_eval_loss_and_perplexity(tmp_path):
    run_dir = _train(tmp_path, "run", _write_jsonl(tmp_path / "chat.jsonl", CHATS),
                     "--eval-split", "0.25")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert evals, rows
    for row in evals:
        assert row["eval_perplexity"] == pytest.approx(math.exp(row["eval_loss"]), rel=1e-6)
    train_rows = [r for r in rows if "loss" in r]
    assert all(r["trained_tokens_per_s"] > 0 and r["peak_memory_gib"] > 0 for r in train_rows)
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_data_file(tmp_path):
    run_dir = _train(tmp_path, "run", _write_jsonl(tmp_path / "chat.jsonl", CHATS),
                     "--eval-data", str(_write_jsonl(tmp_path / "eval.jsonl", CHATS[:6])))
    record = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert record["data"]["eval"]["examples"] == 6
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in rows)


def test_qlora_trains_on_cpu_with_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    run_dir = _train(tmp_path, "run", _write_jsonl(tmp_path / "chat.jsonl", CHATS),
                     "--method", "qlora")
    record = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert record["plan"]["method"] == "qlora"
    rank = json.loads((run_dir / "ranks" / "rank-0.json").read_text())
    assert rank["base_weights"] == "nf4"
    assert rank["global_step"] == 2
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_the_loss_never_builds_the_full_logits(chat_run):
    """The memory model counts TRL's fused LM head (memory.FUSED_TILE_*), not the
    (tokens x vocab) logits: the trainer's loss must not call the LM head module, and must
    equal the model's own cross-entropy."""
    import torch

    session, batch = _first_batch(chat_run)
    trainer = session.trainer
    model = trainer.model
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            fused = trainer.compute_loss(model, dict(batch)).item()
        assert calls == []
        with torch.no_grad():
            plain = model(**batch).loss.item()
        assert calls
    finally:
        hook.remove()
    assert fused == pytest.approx(plain, rel=1e-5)


def test_qlora_keeps_the_unquantized_weights_and_activations_16_bit(tmp_path):
    """No fp32 upcast of embeddings, lm_head and norms (models.load, as the worker loads a
    QLoRA base): the memory model counts them, and the residual stream, in the compute dtype."""
    pytest.importorskip("bitsandbytes")
    import torch

    from ftlaunch.models import builtin as builtin_models
    from ftlaunch.models import presets as models
    from ftlaunch.models.load import load_base_model
    from ftlaunch.models.source import ModelSource

    folder = builtin_models.materialize_builtin(models.resolve("tiny"))
    tiny = ModelSource("tiny", "builtin:tiny", load_from=str(folder), tokenizer=str(folder))
    model = load_base_model(tiny, torch.bfloat16, quantize_4bit=True, for_training=True)
    kinds = {type(p).__name__ for p in model.parameters()}
    assert "Params4bit" in kinds
    others = {p.dtype for p in model.parameters() if type(p).__name__ != "Params4bit"}
    assert others == {torch.bfloat16}
    seen = []
    model.model.layers[-1].register_forward_hook(lambda m, i, o: seen.append(
        (o[0] if isinstance(o, tuple) else o).dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.tensor([[1, 2, 3, 4]]))
    assert seen == [torch.bfloat16]


def test_data_preview_marks_trained_tokens(tmp_path):
    data = _write_jsonl(tmp_path / "chat.jsonl", CHATS)
    proc = run_ftlaunch("data", "preview", "--model", "tiny", "--data", str(data),
                        "--seq-len", "128", "--index", "1")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "[+22" in out  # 10 + 12, the reply of example 1, is trained
    assert "terse" in out and "[+You are terse" not in out
    assert "tokens per example: shortest" in out and "0 longer than --seq-len 128" in out


def test_all_examples_too_long_is_refused_before_launch(tmp_path):
    long = [{"messages": [{"role": "user", "content": "word " * 400},
                          {"role": "assistant", "content": "ok"}]}] * 4
    run_dir = tmp_path / "run"
    proc = run_ftlaunch(*BASE, "--data", str(_write_jsonl(tmp_path / "long.jsonl", long)),
                        "--output-dir", str(run_dir))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no example has a trained token within --seq-len 128" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_a_refused_fresh_start_puts_the_previous_run_back(chat_run, tmp_path):
    """--fresh moves the old run aside before the data is tokenized; data refused then
    leaves the old run where it was, with nothing moved aside."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(chat_run, run_dir)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    long = [{"messages": [{"role": "user", "content": "word " * 400},
                          {"role": "assistant", "content": "ok"}]}] * 4
    proc = run_ftlaunch(*BASE, "--data", str(_write_jsonl(tmp_path / "long.jsonl", long)),
                        "--output-dir", str(run_dir), "--fresh")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no example has a trained token within --seq-len 128" in proc.stderr
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("run")] == ["run"]


def test_bundled_recipes_cover_the_tutorial_defaults():
    from ftlaunch.plan import recipe as recipes

    names = set(recipes.recipe_paths())
    assert {"default", "qlora-chat", "lora-instruct", "completion", "demo"} <= names
    default = recipes.validate(recipes.load_recipe("default"))
    assert default.lora["r"] == 16 and default.lora["lora_alpha"] == 32
    assert default.lora["lora_dropout"] == 0.05 and default.lora["target_modules"] == "all-linear"
    assert default.training["learning_rate"] == 2e-4
    assert default.training["lr_scheduler_type"] == "cosine"
    assert default.training["warmup_steps"] == 0.03
    assert default.training["max_grad_norm"] == 0.3
    assert default.data["packing"] is True
    assert recipes.load_recipe("qlora-chat").method == "qlora"


def test_lora_on_a_big_model_gets_half_the_learning_rate():
    from ftlaunch.plan import job as job_mod

    big = job_mod.resolve(job_mod.Options(model="llama-70b", method="lora",
                                          hardware="8xH100-80GB"), validate=False)
    small = job_mod.resolve(job_mod.Options(model="llama-8b", hardware="1xH100-80GB"),
                            validate=False)
    asked = job_mod.resolve(job_mod.Options(model="llama-70b", method="lora",
                                            hardware="8xH100-80GB",
                                            sets=("learning_rate=3e-4",)), validate=False)
    assert big.recipe.training["learning_rate"] == 1e-4
    assert small.recipe.training["learning_rate"] == 2e-4
    assert asked.recipe.training["learning_rate"] == 3e-4


def test_random_init_rebuilds_the_same_base_in_training_and_export(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_ftlaunch(*BASE, "--random-init", "--output-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert record["model"]["random_init"] is True and record["model"]["config"]
    from ftlaunch.worker.setup import build
    from ftlaunch.export.adapted import load_adapted

    trained_base = build(run_dir).trainer.model.get_base_model().state_dict()
    exported_base = load_adapted(run_dir)[0].get_base_model().state_dict()
    import torch

    weights = [k for k in trained_base if "lora_" not in k and k.endswith(".weight")]
    assert weights
    assert all(torch.equal(trained_base[k], exported_base[k]) for k in weights)
