"""The training data, tokenized once by the launcher into the run directory.

Without it every worker rank re-read the raw data and TRL's SFTTrainer
tokenized it again on every rank, rank 0 first while the others waited in a
collective barrier: a large dataset could outlast the NCCL timeout before
training started, and the launcher's own preflight tokenized (a sample of) the
same data a third time. Here the launcher reads, validates and tokenizes the
full set once; the workers memory-map the result and TRL recognises it as
already processed (an `input_ids` column), so no rank tokenizes.

What is cached is TRL's own tokenization for the data kind, computed the same
way (`trl/trainer/sft_trainer.py`, `SFTTrainer._prepare_dataset`, TRL 1.16):
    conversational      the chat template with `return_assistant_tokens_mask`
                        when the loss is on the assistant's turns; no EOS added
                        (the template decides how a turn ends)
    prompt_completion   prompt and prompt + completion (+ EOS unless the
                        completion already ends with it) tokenized separately;
                        the completion starts where the two diverge
    text                text + EOS unless it already ends with it
with the `labels` column TRL would build from those masks (-100 where no loss).
Truncation and packing are not done here: TRL does them after tokenization
with the run's seq_len and packing settings, and still does them on the cached
set, so they stay TRL's and a changed seq_len or packing reuses the cache.

Layout of a cache directory:
    train/, eval/          `datasets.save_to_disk` folders: input_ids, labels
    train.lengths.npy ...  per example: token count, index of the first trained token
    meta.json              written last, atomically: only a folder with it is complete
    .building/             a build in progress (moved into place once tokenized)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from typing import TYPE_CHECKING

from ftlaunch import preview
from ftlaunch.errors import UserError
from ftlaunch.rundir import atomic_write

if TYPE_CHECKING:
    from datasets import Dataset

FORMAT_VERSION = 1  # bump when what is cached or how it is keyed changes
META = "meta.json"
COLUMNS = ("input_ids", "labels")
_STATS_COLUMNS = ("_length", "_first_trained")
# Below this many rows per process, starting processes costs more than it saves.
_ROWS_PER_PROC = 256
_BATCH = 256
# Keys of a saved tokenizer_config.json that record how it was loaded, not how it tokenizes
# (they change with HF_HUB_OFFLINE or the folder it came from).
_LOAD_TIME_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash", "cache_dir",
                   "revision", "token", "force_download", "proxies", "subfolder",
                   "trust_remote_code", "_from_auto")
_VERSIONED = ("trl", "transformers", "tokenizers", "datasets")
_STAGING = ".building"  # a build in progress: splits are made here, then moved into place


# ---------------------------------------------------------------- launcher side

def build(cache_dir: Path, model_record: dict, dataset, eval_dataset, data_options: dict,
          seq_len: int, num_proc: int = 1) -> dict:
    """Tokenize `dataset` (and `eval_dataset`, both `ftlaunch.data.Dataset`) into
    `cache_dir` as TRL's SFTTrainer would, or reuse the cache already there if it was
    built from the same rows with the same tokenizer, template and options.

    Returns the meta: "fingerprint" (what a worker passes to `load`), "key", "splits",
    "stats" (preview.LengthStats fields over the whole train split at `seq_len`;
    "eval_stats" too with eval data) and "reused"."""
    cache_dir = Path(cache_dir)
    only_assistant = preview.assistant_only(dataset.kind, data_options)
    tokenizer, _ = preview.load_tokenizer(model_record, only_assistant)
    splits = {"train": dataset}
    if eval_dataset is not None:
        splits["eval"] = eval_dataset
    key = _key(tokenizer, splits, dataset.kind, only_assistant, data_options)
    fingerprint = "sha256:" + hashlib.sha256(_canonical(key)).hexdigest()

    meta = _complete_meta(cache_dir)
    if meta is not None and meta["fingerprint"] == fingerprint:
        return _with_stats(cache_dir, meta, seq_len, reused=True)

    _check_tokenizer(tokenizer, dataset.kind)
    started = time.time()
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = cache_dir / _STAGING
    shutil.rmtree(staging, ignore_errors=True)  # left by a build that was killed
    try:
        staging.mkdir()
        described = {name: _build_split(staging, name, data, tokenizer, only_assistant,
                                        fingerprint, num_proc)
                     for name, data in splits.items()}
        # Only now is anything in place touched. Without its meta the folder is incomplete
        # until the new meta lands, so a kill in between leaves a cache that is rebuilt,
        # never one whose meta describes other data.
        (cache_dir / META).unlink(missing_ok=True)
        for name in ("train", "eval"):
            shutil.rmtree(cache_dir / name, ignore_errors=True)
            (cache_dir / _lengths_name(name)).unlink(missing_ok=True)
            if name in splits:
                os.replace(staging / name, cache_dir / name)
                os.replace(staging / _lengths_name(name), cache_dir / _lengths_name(name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "key": key,
        "kind": dataset.kind,
        "assistant_only": only_assistant,
        "splits": described,
        "seconds": round(time.time() - started, 3),
    }
    meta = _with_stats(cache_dir, meta, seq_len, reused=False)
    written = {k: v for k, v in meta.items() if k != "reused"}
    atomic_write(cache_dir / META, json.dumps(written, indent=1, sort_keys=True) + "\n")
    return meta


def length_stats(meta: dict, split: str = "train") -> preview.LengthStats:
    """The length statistics `build` returned, as preview.check takes them."""
    return preview.LengthStats(**meta["stats" if split == "train" else f"{split}_stats"])


# ---------------------------------------------------------------- worker side

def load(cache_dir: Path, expected_fingerprint: str) -> tuple[Dataset, Dataset | None]:
    """(train, eval or None) as memory-mapped `datasets.Dataset`s, from a complete cache
    whose fingerprint is `expected_fingerprint` (the one `build` returned); else a
    UserError. Pass them to SFTTrainer as they are (see the module docstring)."""
    from datasets import load_from_disk

    cache_dir = Path(cache_dir)
    meta = _complete_meta(cache_dir)
    if meta is None:
        raise UserError(
            f"{cache_dir} holds no complete tokenized data (no valid {META}: the launcher's "
            "tokenization did not finish, or the folder was changed). Start the run again "
            "with ftlaunch, which tokenizes the data again.")
    if meta["fingerprint"] != expected_fingerprint:
        raise UserError(
            f"The tokenized data in {cache_dir} was made from other data, tokenizer or data "
            f"options ({meta['fingerprint']}) than this run records ({expected_fingerprint}). "
            "Start the run again with ftlaunch, which tokenizes the data again.")
    loaded = []
    for name in ("train", "eval"):
        if name not in meta["splits"]:
            loaded.append(None)
            continue
        split = load_from_disk(str(cache_dir / name))
        if len(split) != meta["splits"][name]["examples"] or list(split.column_names) != list(COLUMNS):
            raise UserError(f"{cache_dir / name} does not hold what {META} describes; start the "
                            "run again with ftlaunch, which tokenizes the data again.")
        loaded.append(split)
    return loaded[0], loaded[1]


# ---------------------------------------------------------------- key

def _key(tokenizer, splits: dict, kind: str, only_assistant: bool, data_options: dict) -> dict:
    from importlib import metadata

    from ftlaunch import __version__

    template = tokenizer.chat_template if kind == "conversational" else None
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "data": {name: {"fingerprint": data.fingerprint, "format": data.format,
                        "examples": len(data), "rows": _rows_digest(data.rows)}
                 for name, data in splits.items()},
        "tokenizer": _tokenizer_digest(tokenizer),
        "chat_template": (hashlib.sha256(str(template).encode()).hexdigest()
                          if template else None),
        "assistant_only": only_assistant,
        # train.py sets completion_only_loss for prompt/completion data, which is what
        # puts the completion mask into the labels.
        "completion_only": kind == "prompt_completion",
        "system_prompt": data_options.get("system_prompt"),
        "versions": {"ftlaunch": __version__,
                     **{name: metadata.version(name) for name in _VERSIONED}},
    }


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def _rows_digest(rows) -> str:
    """Of the canonical rows themselves: the file fingerprint alone would miss a change in
    how ftlaunch canonicalizes (format detection, system prompt, a new ftlaunch)."""
    digest = hashlib.sha256()
    rows = list(rows)
    for start in range(0, len(rows), 10_000):  # bounded memory for big sets
        digest.update(_canonical(rows[start:start + 10_000]))
    return digest.hexdigest()


def _tokenizer_digest(tokenizer) -> str:
    """Of the tokenizer as saved (vocabulary, merges, normalizer, special tokens, chat
    template): everything that decides the ids, wherever it was loaded from."""
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        for path in sorted(Path(folder).rglob("*")):
            if not path.is_file():
                continue
            data = path.read_bytes()
            if path.name == "tokenizer_config.json":
                config = json.loads(data)
                for name in _LOAD_TIME_KEYS:
                    config.pop(name, None)
                data = _canonical(config)
            name = path.relative_to(folder).as_posix().encode()
            digest.update(len(name).to_bytes(8, "little") + name)
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


# ---------------------------------------------------------------- building

def _check_tokenizer(tokenizer, kind: str) -> None:
    if kind == "conversational" and not tokenizer.chat_template:
        raise UserError(
            "The model's tokenizer has no chat template, so conversations cannot be rendered. "
            "Use data.assistant_only_loss: true (ftlaunch then supplies a template) or "
            "give the tokenizer a chat template.")
    if kind != "conversational" and tokenizer.eos_token is None:
        raise UserError(
            "The model's tokenizer has no EOS token, which SFT appends to every text and "
            "completion so the model learns to stop. Use a tokenizer that defines one.")


def _build_split(folder: Path, name: str, data, tokenizer, only_assistant: bool,
                 fingerprint: str, num_proc: int) -> dict:
    import numpy as np
    from datasets import Dataset

    raw = Dataset.from_list(list(data.rows))
    procs = max(1, min(int(num_proc), len(raw) // _ROWS_PER_PROC))
    digest = fingerprint.split(":")[-1]
    # Fingerprints given, not computed: datasets would otherwise hash (pickle) the
    # tokenizer, and a fixed one makes the saved set's fingerprint, and so the names of
    # the cache files TRL's later maps write beside it, the same on every build.
    tokenized = raw.map(
        tokenize_batch, batched=True, batch_size=_BATCH, with_indices=True,
        remove_columns=raw.column_names, num_proc=procs if procs > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, "kind": data.kind, "only_assistant": only_assistant,
                   "eos": tokenizer.eos_token},
        new_fingerprint=f"{digest[:24]}-{name}", desc=f"Tokenizing {name} data")
    table = tokenized.data
    lengths = np.stack([table.column(c).to_numpy() for c in _STATS_COLUMNS], axis=1)
    tokenized = tokenized.select_columns(list(COLUMNS), new_fingerprint=f"{digest[:24]}-{name}-ids")

    # One process: writing Arrow is quick, and save_to_disk's pool would spawn (re-import
    # everything) rather than fork.
    tokenized.save_to_disk(str(folder / name))
    np.save(folder / _lengths_name(name), lengths.astype(np.int64), allow_pickle=False)
    return {"examples": len(tokenized), "tokens": int(lengths[:, 0].sum()) if len(lengths) else 0,
            "source": str(data.path), "data_fingerprint": data.fingerprint}


def tokenize_batch(batch: dict, indices: list[int], tokenizer, kind: str, only_assistant: bool,
                    eos: str | None) -> dict:
    """TRL 1.16's tokenize_fn and build_labels (SFTTrainer._prepare_dataset) for a batch;
    batched because one call into the Rust tokenizer for many texts is much faster than
    one per text, and gives the same ids. `ftlaunch data preview` shows examples through
    this same function."""
    masks = None
    if kind == "conversational":
        # Conversational data gets no EOS from TRL: the template ends each turn.
        out = tokenizer.apply_chat_template(batch["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=only_assistant)
        ids = [list(x) for x in out["input_ids"]]
        if only_assistant:
            masks = [list(m) for m in out["assistant_masks"]]
            for index, mask in zip(indices, masks):
                if 1 not in mask:  # TRL raises a RuntimeError for this example
                    raise UserError(
                        f"Example {index + 1} has no assistant token under the chat template's "
                        "{% generation %} markers, so assistant-only loss has nothing to "
                        "train on. Fix the example or set data.assistant_only_loss: false.")
    elif kind == "prompt_completion":
        completions = [c if c.endswith(eos) else c + eos for c in batch["completion"]]
        prompt_ids = tokenizer(text=batch["prompt"])["input_ids"]
        ids = tokenizer(text=[p + c for p, c in zip(batch["prompt"], completions)])["input_ids"]
        # Where prompt and prompt + completion diverge, not len(prompt): tokens can merge
        # across the boundary (trl.data_utils.common_prefix_length).
        masks = []
        for prompt, full in zip(prompt_ids, ids):
            start = _common_prefix_length(prompt, full)
            masks.append([0] * start + [1] * (len(full) - start))
    else:
        texts = [t if t.endswith(eos) else t + eos for t in batch["text"]]
        ids = tokenizer(text=texts)["input_ids"]

    if masks is None:
        labels = [list(x) for x in ids]
    else:  # zip, not strict: TRL's build_labels stops at the shorter one too
        labels = [[token if bit else -100 for token, bit in zip(row, mask)]
                  for row, mask in zip(ids, masks)]
    first = [next((i for i, label in enumerate(row) if label != -100), -1) for row in labels]
    return {"input_ids": ids, "labels": labels, "_length": [len(row) for row in ids],
            "_first_trained": first}


def _common_prefix_length(ids: list[int], other: list[int]) -> int:
    length = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        length += 1
    return length


# ---------------------------------------------------------------- reading back

def _lengths_name(split: str) -> str:
    return f"{split}.lengths.npy"


def _complete_meta(cache_dir: Path) -> dict | None:
    """The meta of a complete cache of this format, else None."""
    try:
        meta = json.loads((cache_dir / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        return None
    splits = meta.get("splits")
    if not isinstance(splits, dict) or "train" not in splits:
        return None
    for name in splits:
        if not (cache_dir / _lengths_name(name)).is_file() or not _saved_whole(cache_dir / name):
            return None
    return meta


def _saved_whole(folder: Path) -> bool:
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        files = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(files) and all((folder / f).is_file() for f in files)


def _with_stats(cache_dir: Path, meta: dict, seq_len: int, reused: bool) -> dict:
    """meta with the length statistics at `seq_len` (computed from the per-example lengths,
    so a new seq_len needs no new tokenization) and whether it was reused."""
    import numpy as np

    out = dict(meta)
    for name in meta["splits"]:
        lengths = np.load(cache_dir / _lengths_name(name), allow_pickle=False)
        stats = _stats(lengths, seq_len)
        out["stats" if name == "train" else f"{name}_stats"] = stats
    out["reused"] = reused
    return out


def _stats(lengths, seq_len: int) -> dict:
    """preview.length_stats over (length, first trained index) pairs."""
    import numpy as np

    n = len(lengths)
    if n == 0:
        return {"examples": 0, "shortest": 0, "median": 0, "p95": 0, "longest": 0,
                "over_seq_len": 0, "untrained_after_truncation": 0, "seq_len": seq_len}
    sizes = np.sort(lengths[:, 0])
    first = lengths[:, 1]
    return {
        "examples": int(n),
        "shortest": int(sizes[0]),
        "median": int(sizes[n // 2]),
        "p95": int(sizes[min(n - 1, (95 * n) // 100)]),
        "longest": int(sizes[-1]),
        "over_seq_len": int((sizes > seq_len).sum()),
        # keep_start truncation (ftlaunch's): trained only if a label falls within seq_len
        "untrained_after_truncation": int(((first < 0) | (first >= seq_len)).sum()),
        "seq_len": int(seq_len),
    }

