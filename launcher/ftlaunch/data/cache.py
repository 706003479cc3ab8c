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
Preference pairs are cached as DPOTrainer tokenizes them (data/preference.py): its
prompt_ids, chosen_ids and rejected_ids columns, which its collator takes as they are;
unpaired examples as KTOTrainer does (prompt_ids, completion_ids, label).
Truncation and packing are not done here: TRL does them after tokenization
with the run's seq_len and packing settings, and still does them on the cached
set, so they stay TRL's and a changed seq_len or packing reuses the cache.

Layout of a cache directory:
    train/, eval/          `datasets.save_to_disk` folders: input_ids, labels (or the
                           preference columns)
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
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from ftlaunch.data import preference, tokenize
from ftlaunch.data.formats import PREFERENCE_DATA_KINDS
from ftlaunch.errors import UserError
from ftlaunch.models.source import ModelSource
from ftlaunch.files import atomic_write

if TYPE_CHECKING:
    from datasets import Dataset

DIRECTORY = "data-cache"  # in the run directory
FORMAT_VERSION = 1  # bump when what is cached or how it is keyed changes
META = "meta.json"
COLUMNS = ("input_ids", "labels")  # SFT's; preference pairs have preference.COLUMNS
_STATS_COLUMNS = ("_length", "_first_trained")
# Below this many rows per process, starting processes costs more than it saves.
_ROWS_PER_PROC = 256
# Keys of a saved tokenizer_config.json that record how it was loaded, not how it tokenizes
# (they change with HF_HUB_OFFLINE or the folder it came from).
_LOAD_TIME_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash", "cache_dir",
                   "revision", "token", "force_download", "proxies", "subfolder",
                   "trust_remote_code", "_from_auto")
_VERSIONED = ("trl", "transformers", "tokenizers", "datasets")
_STAGING = ".building"  # a build in progress: splits are made here, then moved into place


# ---------------------------------------------------------------- launcher side

def build(cache_dir: Path, model: ModelSource, dataset, eval_dataset, data_options: dict,
          seq_len: int, num_proc: int = 1, seed: int | None = None) -> dict:
    """Tokenize `dataset` (and `eval_dataset`, both `ftlaunch.data.read.Dataset`) into
    `cache_dir` as TRL's SFTTrainer would, or reuse the cache already there if it was
    built from the same rows with the same tokenizer, template and options. Without an
    `eval_dataset`, data_options["eval_split"] of `dataset` is held out (seeded), here
    once rather than on every rank.

    Returns the meta: "fingerprint" (what a worker passes to `load`), "key", "splits",
    "stats" (tokenize.LengthStats fields over the whole train split at `seq_len`) and
    "reused"."""
    cache_dir = Path(cache_dir)
    only_assistant = tokenize.assistant_only(dataset.kind, data_options)
    tokenizer, _ = tokenize.load_tokenizer(model, only_assistant, dataset.kind)
    splits = {"train": dataset}
    if eval_dataset is not None:
        splits["eval"] = eval_dataset
    elif data_options.get("eval_split"):
        if seed is None:
            raise ValueError("holding out data.eval_split needs the run's seed")
        splits = held_out(dataset, float(data_options["eval_split"]), seed)
    key = _key(tokenizer, splits, dataset.kind, only_assistant)
    fingerprint = "sha256:" + hashlib.sha256(_canonical(key)).hexdigest()

    meta = _complete_meta(cache_dir)
    if meta is not None and meta["fingerprint"] == fingerprint:
        # TRL's truncating/packing maps write their results beside the loaded splits, one
        # set per seq_len and packing: drop the last run's (TRL remakes them in seconds) so
        # they do not pile up over resumes with other settings.
        for split in ("train", "eval"):
            for leftover in (cache_dir / split).glob("cache-*.arrow"):
                leftover.unlink()
        return _with_stats(cache_dir, meta, seq_len, reused=True)

    tokenize.check_tokenizer(tokenizer, dataset.kind)
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
        "splits": described,
        "seconds": round(time.time() - started, 3),
    }
    atomic_write(cache_dir / META, json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return _with_stats(cache_dir, meta, seq_len, reused=False)


def held_out(dataset, fraction: float, seed: int) -> dict:
    """{"train", "eval"}: `fraction` of the rows held out as datasets' seeded
    train_test_split holds them out (the split a run made before ftlaunch cached data)."""
    from dataclasses import replace

    from datasets import Dataset

    parts = Dataset.from_dict({"i": range(len(dataset))}).train_test_split(
        test_size=fraction, seed=seed)
    return {name: replace(dataset, rows=tuple(dataset.rows[i] for i in parts[part]["i"]))
            for name, part in (("train", "train"), ("eval", "test"))}


def length_stats(meta: dict) -> tokenize.LengthStats:
    """The train split's length statistics `build` returned, as tokenize.check takes them."""
    return tokenize.LengthStats(**meta["stats"])


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
        columns = columns_of(meta["key"]["kind"])
        if len(split) != meta["splits"][name]["examples"] or list(split.column_names) != list(columns):
            raise UserError(f"{cache_dir / name} does not hold what {META} describes; start the "
                            "run again with ftlaunch, which tokenizes the data again.")
        loaded.append(split)
    return loaded[0], loaded[1]


def columns_of(kind: str) -> tuple[str, ...]:
    """The columns a cache of this kind of data holds."""
    return preference.columns(kind) if kind in PREFERENCE_DATA_KINDS else COLUMNS


# ---------------------------------------------------------------- key

def _key(tokenizer, splits: dict, kind: str, only_assistant: bool) -> dict:
    """What decides the cached ids and labels: the canonical rows (system prompt and
    format detection applied), the tokenizer as saved (its chat template included), the
    kind of data, the loss mask, and the versions that tokenize."""
    from importlib import metadata

    from ftlaunch import __version__

    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "data": {name: {"fingerprint": data.fingerprint, "rows": _rows_digest(data.rows)}
                 for name, data in splits.items()},
        "tokenizer": _tokenizer_digest(tokenizer),
        "assistant_only": only_assistant,
        "versions": {"ftlaunch": __version__,
                     **{name: metadata.version(name) for name in _VERSIONED}},
    }


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def _rows_digest(rows) -> str:
    """Of the canonical rows themselves: the file fingerprint alone would miss a change in
    how ftlaunch canonicalizes (format detection, system prompt, a new ftlaunch)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(_canonical(row) + b"\n")
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
        (preference.tokenize_batch if data.kind in PREFERENCE_DATA_KINDS
         else tokenize.tokenize_batch),
        batched=True, batch_size=tokenize.BATCH, with_indices=True,
        remove_columns=raw.column_names, num_proc=procs if procs > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, "kind": data.kind, "only_assistant": only_assistant},
        new_fingerprint=f"{digest[:24]}-{name}", desc=f"Tokenizing {name} data")
    table = tokenized.data
    lengths = np.stack([table.column(c).to_numpy() for c in _STATS_COLUMNS], axis=1)
    tokenized = tokenized.select_columns(list(columns_of(data.kind)), new_fingerprint=f"{digest[:24]}-{name}-ids")

    # One process: writing Arrow is quick, and save_to_disk's pool would spawn (re-import
    # everything) rather than fork.
    tokenized.save_to_disk(str(folder / name))
    np.save(folder / _lengths_name(name), lengths.astype(np.int64), allow_pickle=False)
    return {"examples": len(tokenized), "tokens": int(lengths[:, 0].sum())}


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

    lengths = np.load(cache_dir / _lengths_name("train"), allow_pickle=False)
    stats = tokenize.stats_from_lengths(lengths[:, 0].tolist(), lengths[:, 1].tolist(), seq_len)
    return {**meta, "stats": asdict(stats), "reused": reused}
