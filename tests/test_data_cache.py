"""The tokenized-data cache (ftlaunch.data.cache) against the real SFTTrainer.

The cache is only right if a trainer given the cache prepares exactly the
dataset it prepares from the raw rows: same input_ids, labels, packing, and
the same batches out of the collator. That is checked for every data kind,
packed and not, with the tiny model and the real ftlaunch chat template.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from ftlaunch.data import read as data_io
from ftlaunch.data import cache as data_cache
from ftlaunch.data import tokenize
from ftlaunch.data.read import Dataset as Data
from ftlaunch.errors import UserError

MAX_LENGTH = 64
EOS = "<|end|>"  # the tiny tokenizer's EOS (ftlaunch.models.builtin)

# Lengths vary from a few tokens to well past MAX_LENGTH, so packing fits several
# examples in a row, truncation cuts some, and one long prompt leaves nothing trained
# within MAX_LENGTH (TRL drops that example when it truncates).
CHATS = [
    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": f"Add {a} and {b}." + " Please." * (a % 4)},
                  {"role": "assistant", "content": f"{a + b}" + " That is the sum." * (b % 3)}]}
    for a, b in [(3, 4), (10, 12), (7, 8), (20, 5), (6, 6), (9, 1), (2, 2), (8, 3)] * 3
] + [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                  {"role": "user", "content": "And the water?"},
                  {"role": "assistant", "content": "There is water."}]},
    {"messages": [{"role": "user", "content": "Question " * 40},
                  {"role": "assistant", "content": "Answer."}]},
]
# "Say answ" + "er ..." and the like: tokens merge across the prompt/completion boundary
# (in the tiny vocabulary), so the completion starts where the tokenizations diverge.
PAIRS = [{"prompt": f"Reverse {w}:", "completion": f" {w[::-1]}"}
         for w in ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "house"] * 3] + [
    {"prompt": "Say answ", "completion": "er now"},
    {"prompt": "Say wat", "completion": "er please"},
    {"prompt": "Say i", "completion": "s it"},
    {"prompt": "Tell me " * 30, "completion": " a story"},
    {"prompt": "Count:", "completion": " one two three four five six seven eight nine ten" * 3},
    {"prompt": "Stop here", "completion": " done" + EOS},  # TRL adds no second EOS
]
TEXTS = [{"text": f"The {w} is by the river. " * (i % 5 + 1)}
         for i, w in enumerate(["apple", "stone", "cloud", "tiger", "lemon", "piano"] * 4)] + [
    {"text": "Already ends with the end token." + EOS},  # TRL adds no second EOS
    {"text": "x"},
]
ROWS = {"conversational": CHATS, "prompt_completion": PAIRS, "text": TEXTS}
FORMATS = {"conversational": "messages", "prompt_completion": "prompt_completion",
           "text": "text"}


@pytest.fixture(scope="module")
def model_record(offline_cache):
    from ftlaunch.models import builtin as builtin_models
    from ftlaunch.models import presets as models

    from ftlaunch.models.source import ModelSource

    path = builtin_models.materialize_builtin(models.resolve("tiny"))
    return ModelSource("tiny", "builtin:tiny", load_from=str(path), tokenizer=str(path))


@pytest.fixture(scope="module")
def model(model_record):
    from ftlaunch.models import builtin as builtin_models

    return builtin_models.build_random_model(builtin_models.hf_config("tiny"), 0)


def _data(kind: str, rows, folder: Path, name: str = "data.jsonl") -> Data:
    """The rows as the launcher has them: written to a file, read back by ftlaunch.data.read."""
    path = folder / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return data_io.load(path, FORMATS[kind])


def _tokenizer(model_record, assistant_only: bool):
    tokenizer, _ = tokenize.load_tokenizer(model_record, assistant_only)
    if tokenizer.pad_token is None:  # as ftlaunch.worker.main does
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _trainer(model, tokenizer, out: Path, train, evaluation, packing: bool, kind: str,
             assistant_only: bool):
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(output_dir=str(out), use_cpu=True, bf16=False, report_to=[],
                       max_length=MAX_LENGTH, packing=packing, packing_strategy="bfd",
                       assistant_only_loss=assistant_only,
                       completion_only_loss=kind == "prompt_completion",
                       per_device_train_batch_size=2, disable_tqdm=True)
    return SFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=evaluation,
                      processing_class=tokenizer)


def _model_columns(dataset) -> dict:
    """The columns the Trainer feeds the collator (its signature columns)."""
    return {c: dataset[c] for c in ("input_ids", "labels", "seq_lengths")
            if c in dataset.column_names}


def _same_batches(trainer_a, trainer_b, dataset_a, dataset_b) -> None:
    batch_a = trainer_a.data_collator([dict(zip(_model_columns(dataset_a), v)) for v in
                                       zip(*_model_columns(dataset_a).values())])
    batch_b = trainer_b.data_collator([dict(zip(_model_columns(dataset_b), v)) for v in
                                       zip(*_model_columns(dataset_b).values())])
    assert batch_a.keys() == batch_b.keys()
    for name in batch_a:
        value_a, value_b = batch_a[name], batch_b[name]
        if hasattr(value_a, "tolist"):
            assert value_a.dtype == value_b.dtype, name
            value_a, value_b = value_a.tolist(), value_b.tolist()
        assert value_a == value_b, name


# ---------------------------------------------------------------- the trainer sees the same

@pytest.mark.parametrize("packing", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("kind, assistant_only_loss", [
    ("conversational", True), ("conversational", False), ("prompt_completion", True),
    ("text", True)], ids=["chat-assistant-only", "chat-whole", "prompt-completion", "text"])
def test_the_trainer_prepares_the_cache_exactly_as_the_raw_rows(kind, assistant_only_loss,
                                                                  packing, model, model_record,
                                                                  tmp_path):
    from datasets import Dataset

    rows = ROWS[kind]
    train_rows, eval_rows = rows[6:], rows[:6]  # the odd ones (at the end) are trained on
    options = {"assistant_only_loss": assistant_only_loss, "packing": packing}
    assistant_only = tokenize.assistant_only(kind, options)
    meta = data_cache.build(tmp_path / "cache", model_record, _data(kind, train_rows, tmp_path),
                            _data(kind, eval_rows, tmp_path, "eval.jsonl"), options, MAX_LENGTH)
    cached_train, cached_eval = data_cache.load(tmp_path / "cache", meta["fingerprint"])

    # As ftlaunch.worker.main builds it today, from the raw rows...
    raw = _trainer(model, _tokenizer(model_record, assistant_only), tmp_path / "raw",
                   Dataset.from_list(train_rows), Dataset.from_list(eval_rows), packing, kind,
                   assistant_only)
    # ...and from the cache: the mask is in the labels already (see data_cache).
    cached = _trainer(model, _tokenizer(model_record, assistant_only), tmp_path / "cached",
                      cached_train, cached_eval, packing, kind, assistant_only=False)

    for split in ("train_dataset", "eval_dataset"):
        a, b = getattr(raw, split), getattr(cached, split)
        assert len(a) == len(b), split
        # Beyond the model's columns the raw set keeps only its source columns, which the
        # Trainer drops (remove_unused_columns).
        assert set(a.column_names) - set(b.column_names) <= {"messages", "prompt", "completion",
                                                             "text"}
        assert set(b.column_names) <= set(a.column_names)
        assert {c: a.features[c] for c in b.column_names} == dict(b.features), split
        assert _model_columns(a) == _model_columns(b), split
        _same_batches(raw, cached, a, b)
    labels = [t for row in raw.train_dataset["labels"] for t in row]
    masked = kind == "prompt_completion" or assistant_only
    assert (-100 in labels) is masked
    assert any(t != -100 for t in labels)
    if packing:
        assert any(len(s) > 1 for s in raw.train_dataset["seq_lengths"])  # rows shared
    else:  # truncated, and an example with nothing trained within MAX_LENGTH dropped
        assert max(len(ids) for ids in raw.train_dataset["input_ids"]) == MAX_LENGTH
        assert (len(raw.train_dataset) < len(train_rows)) is masked
        # The cache's statistics count exactly the examples TRL itself drops.
        stats = data_cache.length_stats(meta)
        assert stats.untrained_after_truncation == len(train_rows) - len(raw.train_dataset)
        assert stats.over_seq_len >= stats.untrained_after_truncation


def test_the_trainer_does_not_tokenize_the_cache(model, model_record, tmp_path):
    """SFTTrainer takes the cached set as already processed: with tokenizing disabled it
    still prepares it, while the raw rows need the tokenizer (so the check can fail)."""
    from datasets import Dataset

    meta = data_cache.build(tmp_path / "cache", model_record,
                            _data("conversational", CHATS, tmp_path),
                            _data("conversational", CHATS[:4], tmp_path, "eval.jsonl"), {},
                            MAX_LENGTH)
    train, evaluation = data_cache.load(tmp_path / "cache", meta["fingerprint"])

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer was called")

    tokenizer = _tokenizer(model_record, True)
    tokenizer.__class__ = type("NoTokenizing", (type(tokenizer),),
                               {"__call__": refuse, "apply_chat_template": refuse,
                                "encode": refuse, "_encode_plus": refuse})
    for packing in (True, False):
        trainer = _trainer(model, tokenizer, tmp_path / "out", train, evaluation, packing,
                           "conversational", assistant_only=False)
        assert len(trainer.train_dataset) and len(trainer.eval_dataset)
        with pytest.raises(AssertionError, match="tokenizer was called"):
            _trainer(model, tokenizer, tmp_path / "out", Dataset.from_list(CHATS), None, packing,
                     "conversational", assistant_only=False)
    # TRL refuses assistant_only_loss=True on a set that is not conversational, which is
    # why a worker turns it off for the cache (the labels already carry the mask).
    with pytest.raises(ValueError, match="not conversational"):
        _trainer(model, _tokenizer(model_record, True), tmp_path / "out", train, None, True,
                 "conversational", assistant_only=True)


def test_an_eval_split_of_the_cache_holds_out_the_examples_it_did_before(model_record,
                                                                         tmp_path):
    """The launcher holds out data.eval_split once, into the cache's eval split: the same
    examples, in the same order, as the seeded train_test_split of the raw rows that
    each rank used to make."""
    from datasets import Dataset

    rows = [{"text": f"Example {i}: the {w} is by the river."}
            for i, w in enumerate(["apple", "stone", "cloud", "tiger", "lemon"] * 8)]
    meta = data_cache.build(tmp_path / "cache", model_record, _data("text", rows, tmp_path),
                            None, {"eval_split": 0.25}, MAX_LENGTH, seed=42)
    train, evaluation = data_cache.load(tmp_path / "cache", meta["fingerprint"])
    before = Dataset.from_list(rows).train_test_split(test_size=0.25, seed=42)
    after = {"train": train, "test": evaluation}
    tokenizer = _tokenizer(model_record, False)
    for part in ("train", "test"):
        assert [tokenizer.decode(ids) for ids in after[part]["input_ids"]] == [
            text + EOS for text in before[part]["text"]]


# ---------------------------------------------------------------- reuse and rebuild

def _mtimes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns
            for p in folder.rglob("*") if p.is_file()}


def test_a_second_build_reuses_the_cache_without_rewriting_it(model_record, tmp_path):
    cache = tmp_path / "cache"
    data = _data("conversational", CHATS, tmp_path)
    first = data_cache.build(cache, model_record, data, None, {"packing": True}, MAX_LENGTH)
    assert first["reused"] is False
    assert "reused" not in json.loads((cache / data_cache.META).read_text())
    before = _mtimes(cache)

    # Packing and seq_len are TRL's business after tokenization: they reuse the cache.
    again = data_cache.build(cache, model_record, data, None, {"packing": False}, MAX_LENGTH)
    shorter = data_cache.build(cache, model_record, data, None, {}, 20)
    assert again["reused"] is True and shorter["reused"] is True
    assert again["fingerprint"] == shorter["fingerprint"] == first["fingerprint"]
    assert again["stats"] == first["stats"]
    assert shorter["stats"]["seq_len"] == 20
    assert shorter["stats"]["over_seq_len"] > first["stats"]["over_seq_len"]
    assert _mtimes(cache) == before


def test_changed_data_or_options_rebuild(model_record, tmp_path):
    cache = tmp_path / "cache"
    data = _data("conversational", CHATS, tmp_path)
    first = data_cache.build(cache, model_record, data, None, {}, MAX_LENGTH)

    changed_rows = _data("conversational", CHATS[:-1], tmp_path)
    second = data_cache.build(cache, model_record, changed_rows, None, {}, MAX_LENGTH)
    assert second["reused"] is False and second["fingerprint"] != first["fingerprint"]
    train, _ = data_cache.load(cache, second["fingerprint"])
    assert len(train) == len(CHATS) - 1

    # The same rows from another file (another fingerprint) rebuild too...
    (tmp_path / "more").mkdir()
    refingerprinted = _data("conversational", CHATS[:-1] + CHATS[:1], tmp_path / "more")
    refingerprinted = dataclasses.replace(refingerprinted, rows=changed_rows.rows)
    assert refingerprinted.fingerprint != changed_rows.fingerprint
    assert data_cache.build(cache, model_record, refingerprinted, None, {},
                            MAX_LENGTH)["reused"] is False
    # ...and other rows under the same fingerprint (read differently by a new ftlaunch):
    # even the same examples in another order, since the order is the training order.
    reread = dataclasses.replace(refingerprinted, rows=refingerprinted.rows[::-1])
    assert data_cache.build(cache, model_record, reread, None, {}, MAX_LENGTH)["reused"] is False
    assert data_cache.build(cache, model_record, refingerprinted, None, {},
                            MAX_LENGTH)["reused"] is False

    whole = data_cache.build(cache, model_record, refingerprinted, None,
                             {"assistant_only_loss": False}, MAX_LENGTH)
    assert whole["reused"] is False and whole["key"]["assistant_only"] is False
    train, _ = data_cache.load(cache, whole["fingerprint"])
    assert train["labels"] == train["input_ids"]  # the loss is on whole conversations now

    with_eval = data_cache.build(cache, model_record, refingerprinted,
                                 _data("conversational", CHATS[:3], tmp_path, "eval.jsonl"),
                                 {"assistant_only_loss": False}, MAX_LENGTH)
    assert with_eval["reused"] is False
    assert len(data_cache.load(cache, with_eval["fingerprint"])[1]) == 3
    without = data_cache.build(cache, model_record, refingerprinted, None,
                               {"assistant_only_loss": False}, MAX_LENGTH)
    assert without["reused"] is False and not (cache / "eval").exists()
    assert data_cache.load(cache, without["fingerprint"])[1] is None


def test_the_tokenizer_is_part_of_the_key_but_not_where_it_lives(model_record, tmp_path):
    cache = tmp_path / "cache"
    data = _data("conversational", CHATS, tmp_path)
    first = data_cache.build(cache, model_record, data, None, {}, MAX_LENGTH)

    # The same tokenizer files in another folder (a moved cache): the same tokenization.
    moved = tmp_path / "moved"
    shutil.copytree(model_record.tokenizer, moved)
    record = model_record.with_tokenizer(moved)
    assert data_cache.build(cache, model_record, data, None, {}, MAX_LENGTH)["reused"] is True
    assert data_cache.build(cache, record, data, None, {}, MAX_LENGTH)["reused"] is True

    # Another chat template (still marking the assistant's turns): tokenized again.
    template = moved / "chat_template.jinja"
    template.write_text(template.read_text().replace("'<|assistant|>\n'", "'<|assistant|>\n\n'"))
    second = data_cache.build(cache, record, data, None, {}, MAX_LENGTH)
    assert second["reused"] is False and second["fingerprint"] != first["fingerprint"]
    assert second["splits"]["train"]["tokens"] > first["splits"]["train"]["tokens"]


def test_an_interrupted_build_is_refused_and_rebuilt(model_record, tmp_path):
    cache = tmp_path / "cache"
    data = _data("text", TEXTS, tmp_path)
    meta = data_cache.build(cache, model_record, data, None, {}, MAX_LENGTH)
    (cache / data_cache.META).unlink()  # killed before the meta was written
    with pytest.raises(UserError, match="no complete tokenized data"):
        data_cache.load(cache, meta["fingerprint"])
    rebuilt = data_cache.build(cache, model_record, data, None, {}, MAX_LENGTH)
    assert rebuilt["reused"] is False and rebuilt["fingerprint"] == meta["fingerprint"]
    assert len(data_cache.load(cache, meta["fingerprint"])[0]) == len(TEXTS)

    # A data file gone from under a complete meta is no cache either.
    for arrow in (cache / "train").glob("*.arrow"):
        arrow.unlink()
    with pytest.raises(UserError, match="no complete tokenized data"):
        data_cache.load(cache, meta["fingerprint"])
    assert data_cache.build(cache, model_record, data, None, {}, MAX_LENGTH)["reused"] is False


def test_load_refuses_a_cache_of_other_data(model_record, tmp_path):
    cache = tmp_path / "cache"
    data_cache.build(cache, model_record, _data("text", TEXTS, tmp_path), None, {}, MAX_LENGTH)
    with pytest.raises(UserError, match="other data"):
        data_cache.load(cache, "sha256:" + "0" * 64)
    with pytest.raises(UserError, match="no complete tokenized data"):
        data_cache.load(tmp_path / "nothing", "sha256:" + "0" * 64)


# ---------------------------------------------------------------- statistics, errors, procs

@pytest.mark.parametrize("kind", ["conversational", "prompt_completion", "text"])
def test_length_stats_match_preview(kind, model_record, tmp_path):
    # Statistics from the cached per-example lengths (the .npy) against statistics from
    # the tokenized examples themselves, over every row (merged prompt/completion
    # boundaries and texts already ending with EOS included).
    data = _data(kind, ROWS[kind], tmp_path)
    for seq_len in (12, 30, MAX_LENGTH):
        meta = data_cache.build(tmp_path / "cache", model_record, data, None, {}, seq_len)
        _, tokenized, _ = tokenize.tokenize_dataset(model_record, data, {})
        assert data_cache.length_stats(meta) == tokenize.length_stats(tokenized, seq_len)
    assert meta["reused"] is True
    assert tokenize.length_stats(tokenized, 12).over_seq_len  # the cut was exercised


def test_an_example_without_assistant_tokens_is_a_user_error(model_record, tmp_path):
    # ftlaunch.data.read refuses such an example; the cache does not rely on that.
    data = _data("conversational", CHATS[:3], tmp_path)
    data = dataclasses.replace(data, rows=data.rows + ({"messages": [
        {"role": "user", "content": "Only me."}]},))
    with pytest.raises(UserError, match="Example 4 has no assistant token"):
        data_cache.build(tmp_path / "cache", model_record, data, None, {}, MAX_LENGTH)
    assert not (tmp_path / "cache" / data_cache.META).exists()

    # A failed rebuild leaves the cache that was there as it was.
    good = data_cache.build(tmp_path / "cache", model_record, _data("conversational", CHATS[:3],
                                                                    tmp_path), None, {}, MAX_LENGTH)
    with pytest.raises(UserError, match="Example 4 has no assistant token"):
        data_cache.build(tmp_path / "cache", model_record, data, None, {}, MAX_LENGTH)
    assert len(data_cache.load(tmp_path / "cache", good["fingerprint"])[0]) == 3
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "meta.json", "train", "train.lengths.npy"]


def test_processes_give_the_same_cache(model_record, tmp_path):
    rows = [{"text": f"Example {i}: the {w} is by the river." * (i % 3 + 1)}
            for i, w in enumerate(["apple", "stone", "cloud", "tiger"] * 150)]
    data = _data("text", rows, tmp_path)
    one = data_cache.build(tmp_path / "one", model_record, data, None, {}, MAX_LENGTH)
    two = data_cache.build(tmp_path / "two", model_record, data, None, {}, MAX_LENGTH,
                           num_proc=2)
    assert one["fingerprint"] == two["fingerprint"] and one["stats"] == two["stats"]
    a = data_cache.load(tmp_path / "one", one["fingerprint"])[0]
    b = data_cache.load(tmp_path / "two", two["fingerprint"])[0]
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
