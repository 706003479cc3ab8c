"""Run this node's workers and tell how they ended: the launch itself, its restarts after
a failure (launch.restarts decides which), the notes the launcher logs beside the
workers' lines, and the outcome (finished, preempted with a checkpoint, stopped by a
signal, stalled, a non-finite loss, or failed)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ftlaunch.run import checkpoints
from ftlaunch.run import heartbeat
from ftlaunch.launch import diskfull
from ftlaunch.launch import interrupts
from ftlaunch.launch import process
from ftlaunch.launch import restarts
from ftlaunch.run import rank_logs
from ftlaunch.run import record as run_record
from ftlaunch.plan import recipe as recipes
from ftlaunch.launch import render
from ftlaunch.run import directory as rundir
from ftlaunch.launch import throughput
from ftlaunch.files import atomic_write
from ftlaunch.errors import UserError
from ftlaunch.plan.job import Job


def run(job: Job, run_dir: Path, log_path: Path, record: run_record.RunRecord,
        resume_from: Path | None,
        port: int | None, rendezvous: render.Rendezvous, echo, agree=None) -> int:
    """Launch this node's workers, restart them after a failure while --max-restarts
    allows (launch.restarts), and return the launcher's exit code. `agree(refusal,
    failure)` -> restarts.Agreement: how this node agrees on a restart with the others
    (multinode.restart_agreement); one node decides alone."""
    budget = restarts.RestartBudget(job.options.max_restarts)
    agree = agree or restarts.alone(run_dir)
    writes_record = job.cluster.node_rank == 0 or record.strategy.node_local
    while True:
        attempt = _attempt(job, run_dir, log_path, record, resume_from, port, rendezvous, echo)
        failure = restarts.failure_of(run_dir, attempt) if budget.limit else None
        if failure is not None:
            refusal = budget.refusal(failure)
            with diskfull.told_as_full(run_dir):  # it sets torn checkpoints aside
                agreement = agree(refusal, failure)
            if agreement.go:
                event = budget.add(failure, agreement)
                backoff = budget.backoff_s()
                log_notes(log_path, [budget.announce(event, backoff), *agreement.notes], echo)
                interrupts.phase("while waiting to restart the workers: `ftlaunch resume "
                                 f"{run_dir}` continues from the last complete checkpoint.")
                time.sleep(backoff)
                # Recorded once it happens: a stop during the backoff leaves none listed.
                record = dataclasses.replace(record, restarts=run_record.Restarts(
                    budget.limit, tuple(budget.done)))
                if writes_record:
                    with diskfull.told_as_full(run_dir):
                        run_record.write(run_dir, record)
                resume_from = agreement.checkpoint
                if job.cluster.master_port is None and port is not None:
                    port = process.free_port()  # the last one may still be in TIME_WAIT
                continue
            log_notes(log_path, [f"not restarted: {why}"
                                 for why in ([refusal] if refusal else agreement.notes)], echo)
        if attempt.stall is not None:
            return _stalled(run_dir, attempt.stall, log_path, echo)
        return _outcome(run_dir, attempt.code, attempt.received, echo, log_path,
                        attempt.started, attempt.ended)


def _attempt(job: Job, run_dir: Path, log_path: Path, record: run_record.RunRecord,
             resume_from: Path | None, port: int | None, rendezvous: render.Rendezvous,
             echo) -> restarts.Attempt:
    """One launch of this node's workers, until every one of them has ended."""
    plan = job.plan
    env = process.worker_env(plan.processes_per_node, job.hardware.cpu_cores,
                            on_cpu=plan.on_cpu, offline=record.model.is_local,
                            distributed=record.distributed.env)
    config_path = run_dir / "accelerate.yaml"
    direct_env = process.single_process_env(config_path, env)
    argv_launch = process.command(config_path, run_dir, resume_from, port,
                                 rendezvous if job.cluster.nnodes > 1 else None,
                                 direct=direct_env is not None)
    if direct_env is not None:
        env = direct_env
        echo("Launching (one process, with the environment accelerate launch would give it): "
             + process.printable(argv_launch))
    else:
        echo("Launching: " + process.printable(argv_launch))
    ranks = [job.cluster.node_rank * plan.processes_per_node + i
             for i in range(plan.processes_per_node)]
    interrupts.check()  # the last moment a stop means "nothing was trained"
    (run_dir / heartbeat.STALL_FILE).unlink(missing_ok=True)
    watch = (heartbeat.Watch(run_dir, job.options.stall_timeout_s, ranks)
             if job.options.stall_timeout_s else None)
    started = time.time()  # error records and heartbeats of earlier launches do not count
    code, received, stall, ended = process.run(argv_launch, env, log_path, job.options.grace_s, watch)
    interrupts.phase(f"after the workers ended: `ftlaunch resume {run_dir}` continues from "
                     "the last complete checkpoint.")
    if job.cluster.node_rank == 0:  # rank 0, which logs the rates, runs on node 0
        throughput.record(plan, recipes.packing(job.recipe.data), run_dir, run_dir / "metrics.jsonl", started)
    resume_step = (checkpoints.step_of(resume_from) or 0) if resume_from is not None else 0
    return restarts.Attempt(code, received, stall, tuple(ended), started, resume_step)


def _resume_point(run_dir: Path) -> str:
    last = checkpoints.scan(run_dir / "checkpoints").newest
    return last.path.name if last else restarts.FROM_THE_START


def _stalled(run_dir: Path, stall, log_path: Path, echo) -> int:
    """The job was killed for making no progress: say where each rank was, keep it in
    stalled.json, and how to go on."""
    atomic_write(run_dir / heartbeat.STALL_FILE, json.dumps(stall.to_json()) + "\n")
    echo(f"Stalled: {stall.describe()} The job was stopped; the Python stacks of the ranks "
         f"that could still answer are in {log_path} and {run_dir / rundir.RANKS_DIR}/rank-*.log. "
         f"Exit code {process.STALLED_EXIT}: re-run the same command to resume from "
         f"{_resume_point(run_dir)}.")
    return process.STALLED_EXIT


def log_notes(log_path: Path, notes: list[str], echo) -> None:
    """What the launcher decided, on the terminal and in this node's log (train.log) with
    the workers' lines."""
    if not notes:
        return
    with open(log_path, "a", encoding="utf-8") as log:
        for note in notes:
            line = f"ftlaunch: {note.rstrip('.')}."
            echo(line)
            log.write(line + "\n")


def _outcome(run_dir: Path, code: int, received: int | None, echo,
             log_path: Path | None = None, started: float = 0.0, ended=()) -> int:
    """The launcher's exit code: done, preempted with a checkpoint, stopped, failed (`ended`:
    the workers that ended by themselves, process.run's)."""
    if rundir.is_finished(run_dir):
        # The adapter is written whole and renamed into place after every rank's last
        # collective: a rank that fails after that (seen: a C++ abort in a ZeRO-3 rank's
        # interpreter exit) cannot take anything away from the run.
        if code != 0:
            echo(f"ftlaunch: note: the workers exited with code {code} after the adapter "
                 "was complete; the run is finished (their output is in the logs).")
        echo(final_summary(run_dir))
        return 0
    stop = rundir.read_stop_record(run_dir)
    if stop is not None and stop.get("why") == rundir.NON_FINITE_STOP:
        raise UserError(_non_finite_message(run_dir, stop))
    if stop is not None and checkpoints.verify(Path(stop["checkpoint"]))[0] is None:
        echo(f"Preempted ({stop['why']}): stopped after step {stop['step']} with a complete "
             f"checkpoint, {stop['checkpoint']}. Exit code {process.PREEMPTED_EXIT}: re-run the "
             f"same command (or `ftlaunch resume {run_dir}`) to continue from there.")
        return process.PREEMPTED_EXIT
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
    lines = [f"Done. {_loss_summary(metrics, [loss for _, loss in losses])}"]
    if rewards := _reward_summary(metrics):
        lines.append(rewards)
    done = run_record.load(run_dir).restarts.done if run_record.exists(run_dir) else ()
    if done:
        lines += [f"Restarted after {len(done)} failure(s), each time from a complete checkpoint:",
                  *restarts.describe(done)]
    lines += [f"Run directory: {run_dir}"]
    lines += [f"  {name:<14} {what}" for name, what in files if (run_dir / name.rstrip('/')).exists()]
    lines += ["Next:",
              f"  ftlaunch generate {here} --prompt 'your question'   try the adapter",
              f"  ftlaunch merge {here}   fold it into the base: one standalone model folder",
              "  (the same training command again does nothing: the run is finished; "
              "--fresh trains again)"]
    return "\n".join(lines)


def _reward_summary(metrics: Path) -> str | None:
    """DPO: the reward accuracy (how often chosen outscores rejected); KTO: the reward
    margin (desirable minus undesirable completions): on the held-out examples at the
    first and last evaluation, else over the first and last logged steps."""
    rows = rundir.metrics_rows(metrics) if metrics.exists() else []
    for key, what, where in (
            ("eval_rewards/accuracies", "Reward accuracy", "held-out pairs"),
            ("rewards/accuracies", "Reward accuracy", "training batches"),
            ("eval_rewards/margins", "Reward margin", "held-out examples"),
            ("rewards/margins", "Reward margin", "training batches")):
        points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
        if len(points) >= 2:
            (first_step, first), (last_step, last) = points[0], points[-1]
            return (f"{what} on {where}: {first:.3f} at step {first_step}, "
                    f"{last:.3f} at step {last_step}.")
    return None


def _loss_summary(metrics: Path, losses: list[float]) -> str:
    if not metrics.exists():  # a node-local copy of a node other than 0
        return "The loss is logged in node 0's run directory."
    if not losses:
        return "No loss was logged."
    return f"Loss {losses[0]:.4f} at the first log, {losses[-1]:.4f} at the last ({len(losses)} logs)."
