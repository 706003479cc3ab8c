"""The checks a start makes before anything is written: the data read and validated (the
evaluation split, a token preflight for dry runs), the free disk and host RAM the run
needs, and the run directory prepared once the disk is known to suffice."""

from __future__ import annotations

import json
from pathlib import Path

from ftlaunch.launch import preflight
from ftlaunch.launch import run_files
from ftlaunch.data import tokenize
from ftlaunch.data.formats import PREFERENCE_KINDS
from ftlaunch.models.source import ModelSource
from ftlaunch.run import directory as rundir
from ftlaunch.data import read as data_io
from ftlaunch.errors import UserError
from ftlaunch.plan import objectives
from ftlaunch.plan import recipe as recipes
from ftlaunch.plan.job import Job
from ftlaunch.resources import demo_data_path, demo_pairs_path


def default_data(job: Job) -> Path:
    """Without --data: the bundled demo set (its preference pairs for DPO and KTO)."""
    return demo_data_path() if job.recipe.objective == "sft" else demo_pairs_path()


def load_data(job: Job) -> tuple[data_io.Dataset, data_io.Dataset | None]:
    """(training data, evaluation file's data or None), read and validated."""
    options = job.recipe.data
    source = Path(job.options.data).expanduser() if job.options.data else default_data(job)
    dataset = data_io.load(source, options.get("format", "auto"), options.get("system_prompt"))
    objective = objectives.get(job.recipe.objective)
    objectives.check_data(objective, dataset.kind, dataset.format, source)
    eval_dataset = None
    if options.get("eval_data"):
        eval_dataset = data_io.load(Path(options["eval_data"]).expanduser(), dataset.format,
                                    options.get("system_prompt"), flag="--eval-data")
    unpairs = objective is objectives.KTO and dataset.kind in PREFERENCE_KINDS
    _check_eval_split(options, dataset, eval_dataset, job.plan.global_batch_size,
                      examples_per_row=2 if unpairs else 1)
    if unpairs:
        # KTO trains each pair as two examples (TRL's unpair_preference_dataset). The
        # pairs are held out first, so no pair has one half trained and the other held out.
        if eval_dataset is None and options.get("eval_split"):
            from ftlaunch.data import cache as data_cache

            parts = data_cache.held_out(dataset, float(options["eval_split"]),
                                        recipes.seed(job.recipe.training))
            dataset, eval_dataset = parts["train"], parts["eval"]
        dataset = dataset.unpaired()
        eval_dataset = eval_dataset.unpaired() if eval_dataset is not None else None
    return dataset, eval_dataset


def balance_note(job: Job, dataset) -> str | None:
    """KTO on unbalanced data: the weights TRL's KTOTrainer would recommend when the ones
    set do not balance desirable and undesirable examples (the KTO paper's eq. 8: their
    weighted counts within 1 to 4/3 of each other). KTOTrainer checks this in the step
    the worker replaces (worker.setup.trainer_class), so the launcher says it instead."""
    if job.recipe.objective != "kto":
        return None
    labels = [row["label"] for row in dataset.rows]
    good, bad = sum(labels), len(labels) - sum(labels)
    if not good or not bad:
        return (f"--data holds {good} desirable and {bad} undesirable examples: KTO then "
                f"only {'raises' if good else 'lowers'} the likelihood of what it is shown "
                "against the reference, with no contrast to learn from")
    if good == bad:
        return None
    good_weight = float(job.recipe.training.get("desirable_weight", 1.0))
    bad_weight = float(job.recipe.training.get("undesirable_weight", 1.0))
    # TRL's bounds, rounded as it rounds them.
    good_range = (round(bad * bad_weight / good, 2), round(bad * bad_weight / good * 1.33, 2))
    bad_range = (round(good * good_weight / bad / 1.33, 2), round(good * good_weight / bad, 2))
    if (good_range[0] <= good_weight <= good_range[1]
            or bad_range[0] <= bad_weight <= bad_range[1]):
        return None
    return (f"--data holds {good} desirable and {bad} undesirable examples, and "
            f"desirable_weight {good_weight:g} with undesirable_weight {bad_weight:g} does "
            "not balance them (the KTO paper's eq. 8). Set either --set desirable_weight="
            f"{good_range[0]:.2f}..{good_range[1]:.2f} or --set undesirable_weight="
            f"{bad_range[0]:.2f}..{bad_range[1]:.2f}, not both")


def _check_eval_split(data_options: dict, dataset, eval_dataset, global_batch: int,
                      examples_per_row: int = 1) -> None:
    """The held-out split leaves at least one global batch to train on; `examples_per_row`:
    2 for pairs KTO trains on (held out whole, then unpaired)."""
    import math

    split = data_options.get("eval_split") or 0
    if not 0 <= split < 1:
        raise UserError(f"--eval-split {split} must be a fraction between 0 and 1 (e.g. 0.05).")
    if split and eval_dataset is not None:
        raise UserError("Give either --eval-split or --eval-data, not both.")
    if split and round(len(dataset) * split) < 1:
        raise UserError(f"--eval-split {split} of {len(dataset)} examples holds out none; use a "
                        "larger fraction or --eval-data FILE.")
    # Held out as datasets' train_test_split does (ceil); fewer examples left than one
    # global batch would make every step the same partial batch, or none at all.
    left = (len(dataset) - math.ceil(split * len(dataset))) * examples_per_row
    if split and left < global_batch:
        most = (len(dataset) - global_batch / examples_per_row) / len(dataset)
        rows = "pairs" if examples_per_row == 2 else "examples"
        raise UserError(f"--eval-split {split} of {len(dataset)} {rows} leaves {left} for "
                        f"training{' (examples, two per pair)' if examples_per_row == 2 else ''}"
                        f", fewer than one global batch ({global_batch}). "
                        + (f"Hold out less (at most {most:.3g}), or give" if most > 0 else "Give")
                        + " the evaluation examples in a file with --eval-data FILE.")


# Enough examples for length statistics that hold for the whole set, in seconds.
_PREFLIGHT_SAMPLE = 2000


def token_preflight(job: Job, dataset, model: ModelSource) -> list[str]:
    """Tokenize (a sample of) the data as training will: too-long and untrainable
    examples are reported now, and data with nothing to train on is refused."""
    import random

    if Path(model.tokenizer).is_absolute() and not Path(model.tokenizer).exists():
        return []  # a dry run before the built-in model was ever built: nothing to read yet
    rows = list(dataset.rows)
    sampled = len(rows) > _PREFLIGHT_SAMPLE
    if sampled:
        rows = random.Random(0).sample(rows, _PREFLIGHT_SAMPLE)
    _, tokenized, _ = tokenize.tokenize_dataset(model, dataset, job.recipe.data, rows)
    stats = tokenize.length_stats(tokenized, job.plan.seq_len)
    source = f"--data {dataset.path}" + (f" (a sample of {len(rows)})" if sampled else "")
    return tokenize.check(stats, source)


def prepare_checked(job: Job, run_dir: Path, data: tuple, model: ModelSource, identity: dict,
                    fresh: bool):
    """rundir.prepare, with the free disk checked before it makes the directory or moves
    an old run aside (so a refusal changes nothing), or, for a resume, once its
    checkpoints are known (prepare only reads an existing run)."""
    resuming = (run_dir / rundir.RUN_FILE).is_file() and not fresh
    if not resuming:
        rundir.check_writable(run_dir)  # a read-only place is that, not "too small"
        check_disk(job, run_dir, data, model, None)
    state = rundir.prepare(run_dir, identity, fresh=fresh, allow_changed=job.options.allow_changed)
    if resuming and state.kind != "finished":  # a finished run needs no disk: nothing to do
        check_disk(job, run_dir, data, model, state)
    return state


def check_disk(job: Job, run_dir: Path, data: tuple, model: ModelSource, state) -> None:
    """Free disk for the checkpoints this run will keep, its adapter and its data cache
    (`data`: the training set and the evaluation file's, or None)."""
    training = job.recipe.training
    complete = state.complete if state is not None else ()
    needed, why = preflight.disk_needed(
        job.plan, job.model, run_files.checkpoints_kept(job.recipe),
        extra_bytes=_data_cache_estimate(data),
        max_steps=training.get("max_steps"),
        save_steps=None if job.options.save_every_s else training.get("save_steps"),
        from_step=complete[-1].step if complete else 0, existing=len(complete),
        tokenizer=preflight.tokenizer_bytes(model.tokenizer))
    preflight.check_disk(run_dir, needed, why)


# The tokenized cache against the data as JSON: a token is ~4 bytes of text and is stored
# as a 4-byte id and an 8-byte label; then as much again for the truncated or packed copy
# TRL's maps write beside it (measured 1.4x the cache for packed + unpacked builds).
_CACHE_PER_DATA_BYTE = 3 * 2


def _data_cache_estimate(data: tuple) -> int:
    return _CACHE_PER_DATA_BYTE * sum(len(json.dumps(row)) for dataset in data
                                      if dataset is not None for row in dataset.rows)


def check_ram(job: Job, echo) -> None:
    """Host RAM to load the model (and, on CPU, to train). Loading is a transient peak that
    shares the page cache between processes, so on GPUs only more than the machine has is
    refused; more than is free now is a note."""
    if job.options.hardware:
        return  # described hardware, not this machine's
    needed, why = preflight.ram_needed(job.plan, job.model)
    if job.plan.on_cpu:
        preflight.check_ram(needed, why, on_cpu=True)
        return
    preflight.check_ram(needed, why, available=job.hardware.ram_bytes)
    try:
        preflight.check_ram(needed, why)
    except UserError as exc:
        echo(f"Note: {exc}")
