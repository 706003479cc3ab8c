"""Start (or resume) a training run: preflight, run directory, configs, launch.

Everything that can fail because of the user fails here, before a worker
starts: the data is read and validated, the output directory is checked, the
port is checked, the plan must fit. The parts: checks.py (data, disk, RAM, the
run directory), run_files.py (what is written before a worker starts),
multinode.py (the nodes' meeting), workers.py (the launch and its outcome).
"""

from __future__ import annotations

from pathlib import Path

from ftlaunch.run import checkpoints
from ftlaunch.launch import checks
from ftlaunch.launch import diskfull
from ftlaunch.launch import interrupts
from ftlaunch.launch import multinode
from ftlaunch.launch import process
from ftlaunch.launch import meeting
from ftlaunch.run import record as run_record
from ftlaunch.models import adapter as adapters
from ftlaunch.models.source import ModelSource
from ftlaunch.plan import recipe as recipes
from ftlaunch.launch import render
from ftlaunch.run import resume_rules
from ftlaunch.run import directory as rundir
from ftlaunch.run import lock as runlock
from ftlaunch.launch import run_files
from ftlaunch.launch import throughput
from ftlaunch.launch import workers
from ftlaunch.detect import runtime
from ftlaunch.detect.cluster import DEFAULT_PORT
from ftlaunch.errors import UserError
from ftlaunch.units import count
from ftlaunch.plan.job import Job


def start_run(job: Job, argv: list[str], echo) -> int:
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
        return multinode.train_joining_node(job, argv, echo)
    if not options.data:
        echo(f"No --data given: training on the bundled demo dataset {checks.default_data(job)}.")
    dataset, eval_dataset = checks.load_data(job)
    if balance := checks.balance_note(job, dataset):
        echo(f"Note: {balance}.")
    model = run_files.model_record(job, materialize=not options.dry_run)
    if job.start_adapter is not None:
        adapters.check_base(job.start_adapter, (model.name, model.source, model.load_from))
        if job.start_adapter.note:
            echo(f"Note: {job.start_adapter.note}.")
    if options.dry_run:  # a real start tokenizes all of it into the run's data cache instead
        for note in checks.token_preflight(job, dataset, model):
            echo(f"Note: {note}.")
    if cluster.master_port is not None and cluster.node_rank == 0:
        process.check_port_free(cluster.master_port, meeting.bind_host(cluster.master_addr))

    identity = run_files.run_identity(job, dataset, eval_dataset, model)
    checks.check_ram(job, echo)
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
    state = checks.prepare_checked(job, job.output_dir, (dataset, eval_dataset), model,
                                   identity, options.fresh and not dry)
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
        notes += resume_rules.check_resume(state.checkpoint, plan, job.recipe, options.allow_changed)

    port = cluster.master_port or (process.free_port() if plan.num_processes > 1 else None)
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
            run_files.write(job, run_dir, dataset, eval_dataset, identity, argv, rendezvous,
                            model, multinode.nodes_record(job, None))
            echo(f"Wrote {run_dir / 'accelerate.yaml'} and {run_dir / rundir.RUN_FILE}.")
        echo("Launch command (dry run, nothing trained):")
        echo("  " + process.printable(process.command(
            run_dir / "accelerate.yaml", run_dir, resume_from, port,
            rendezvous if cluster.nnodes > 1 else None)))
        echo("(the same ftlaunch command without --dry-run first tokenizes the data into the "
             "run's cache, which the workers read)")
        return 0

    def start_files(verdict: meeting.Verdict | None) -> tuple[run_record.RunRecord, Path | None]:
        """The run files every worker reads, written once the nodes (if several) agreed.
        The data first: its refusal must find the checkpoints where they were."""
        with diskfull.told_as_full(run_dir):
            cache = run_files.build_data_cache(job, run_dir, model, dataset, eval_dataset,
                                               echo, lock, state.moved_aside_to)
        interrupts.check()  # a stop during tokenizing, before anything else changes
        checkpoint = state.checkpoint
        if verdict is not None and verdict.storage == run_record.NODE_LOCAL:
            checkpoint, more = multinode.agreed_checkpoint(job, run_dir, state,
                                                           verdict.resume_step)
            if checkpoint is not state.checkpoint:
                notes.extend(more)
        notes.extend(rundir.set_aside_torn(run_dir, state))
        with diskfull.told_as_full(run_dir):
            record = run_files.write(job, run_dir, dataset, eval_dataset, identity, argv,
                                     rendezvous, model, multinode.nodes_record(job, verdict),
                                     cache)
        rundir.clear_stop_record(run_dir)
        if checkpoint is not None:
            notes.insert(0, f"resuming {run_dir} from {checkpoint.path.name}")
        return record, checkpoint.path if checkpoint else None

    if cluster.nnodes > 1:
        started: list = []
        multinode.meet_as_node_zero(job, run_dir, state, port, identity,
                                    lambda v: started.append(start_files(v)), echo)
        record, resume_from = started[0]
    else:
        record, resume_from = start_files(None)
    workers.log_notes(run_dir / "train.log", notes, echo)
    echo(_launch_table(job, run_dir, record.data.cache or {}, resume_from))
    agree = (multinode.restart_agreement(job, run_dir, port, record.nodes["storage"], echo)
             if cluster.nnodes > 1 else None)
    return workers.run(job, run_dir, run_dir / "train.log", record, resume_from, port,
                       rendezvous, echo, agree)


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
