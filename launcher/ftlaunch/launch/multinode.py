"""Starting a run on several nodes: node 0 meets the others (ftlaunch.launch.meeting) and
writes the run files once they agree; a joining node (node rank > 0) checks itself,
meets node 0, and starts its workers, with node 0's run directory or one of its own.
With node-local run directories the nodes resume from a checkpoint every node holds.
After a failure, the nodes meet again the same way to restart together (restart_agreement)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ftlaunch import __version__
from ftlaunch.launch import checks
from ftlaunch.launch import diskfull
from ftlaunch.launch import meeting
from ftlaunch.launch import render
from ftlaunch.launch import restarts
from ftlaunch.launch import run_files
from ftlaunch.launch import workers
from ftlaunch.run import checkpoints
from ftlaunch.run import record as run_record
from ftlaunch.run import resume_rules
from ftlaunch.run import directory as rundir
from ftlaunch.run import lock as runlock
from ftlaunch.errors import UserError
from ftlaunch.plan.job import Job


_FSDP_NEEDS_SHARED = (
    "FSDP writes each checkpoint as shards of every rank plus one index, which a node can only "
    "load when it sees all of them: node-local run directories cannot hold it. Put --output-dir "
    "on a filesystem shared by every node (mounted at the same path), or use --engine "
    "deepspeed, whose checkpoints can be kept per node.")
_PRECOMPUTE_NEEDS_SHARED = (
    "precompute_ref_log_probs: rank 0 writes the reference log-probs into the run directory "
    "(reference-logps/) for every rank to read, which the other nodes' ranks cannot do from "
    "node-local run directories. Put --output-dir on a filesystem shared by every node "
    "(mounted at the same path), or leave precompute_ref_log_probs off (the reference then "
    "runs in every step).")


def node_local_refusal(job: Job) -> str | None:
    """Why this job's nodes cannot each keep a run directory of their own (None: they can)."""
    if job.plan.engine == "fsdp":
        return _FSDP_NEEDS_SHARED
    if job.recipe.training.get("precompute_ref_log_probs"):
        return _PRECOMPUTE_NEEDS_SHARED
    return None


def _own_hello(job: Job, run_dir: Path, shared: bool, steps, data_fingerprint,
               error: str | None = None) -> dict:
    return meeting.hello(job.cluster.node_rank, job.hardware, run_files.plan_hash(job.plan),
                       __version__, run_dir, data_fingerprint, shared, steps, error,
                       job.options.max_restarts)


def meet_as_node_zero(job: Job, run_dir: Path, state, port: int, identity: dict, on_go,
                      echo) -> meeting.Verdict:
    """Node 0 of several: wait for the other nodes, check they match, agree on storage
    and on the checkpoint to resume from; the run files are written (on_go) before any
    node is told to start."""
    cluster = job.cluster
    launch_id = meeting.mark_launch(run_dir)
    mine = _own_hello(job, run_dir, True, [c.step for c in state.complete], identity["data"])
    storage_ok = {run_record.NODE_LOCAL: node_local_refusal(job)}
    try:
        verdict = meeting.serve(cluster.master_addr, port, cluster.nnodes, launch_id,
                              job.options.join_timeout_s,
                              lambda others: meeting.decide([mine, *others], storage_ok), on_go,
                              log=echo)
    finally:
        meeting.unmark_launch(run_dir, launch_id)
    if not verdict.ok:
        raise UserError(f"The nodes cannot train together: {verdict.message}")
    echo(f"ftlaunch: {cluster.nnodes} nodes agree ({verdict.storage} run directory"
         + (f", resuming from step {verdict.resume_step}" if verdict.resume_step else "") + ")")
    return verdict


def train_joining_node(job: Job, argv: list[str], echo) -> int:
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
        checks.check_ram(job, echo)
        node_error = None
    except UserError as exc:
        node_error = str(exc)
    try:  # needed only with a run directory of this node's own; the error waits till then
        dataset, eval_dataset = checks.load_data(job)
        data_error = None
    except UserError as exc:
        dataset = eval_dataset = None
        data_error = str(exc)
    model = run_files.model_record(job, materialize=True)
    port = cluster.master_port
    rendezvous = render.Rendezvous(machine_rank=cluster.node_rank,
                                   main_process_ip=cluster.master_addr, main_process_port=port)

    def make_hello(launch_id: str) -> dict:
        if node_error:
            return _own_hello(job, run_dir, False, [], None, error=node_error)
        if meeting.sees_launch(run_dir, launch_id):
            return _own_hello(job, run_dir, True, None, None)
        try:
            if data_error:
                raise UserError(data_error)
            identity = run_files.run_identity(job, dataset, eval_dataset, model)
            local["identity"] = identity
            if "lock" not in local:
                rundir.check_writable(run_dir)
                try:
                    local["lock"] = runlock.acquire(run_dir, argv)[0]
                except UserError:
                    # On NFS node 0's launch mark can show up late (cached lookups): its
                    # lock is then this launch's, not another job's.
                    if meeting.sees_launch(run_dir, launch_id):
                        return _own_hello(job, run_dir, True, None, None)
                    raise
            if options.fresh:  # moved aside once the nodes agree, not before
                rundir.check_writable(run_dir)
                checks.check_disk(job, run_dir, (dataset, eval_dataset), model, None)
                return _own_hello(job, run_dir, False, [], identity["data"])
            state = checks.prepare_checked(job, run_dir, (dataset, eval_dataset), model,
                                           identity, fresh=False)
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

    verdict = meeting.join(cluster.master_addr, port, options.join_timeout_s, make_hello, log=echo)
    if not verdict.ok:
        raise UserError(f"The nodes cannot train together: {verdict.message}")
    if verdict.storage == run_record.SHARED:
        echo(f"ftlaunch: node {cluster.node_rank} joined; node 0 wrote the run files in {run_dir}")
        resume_from = (checkpoints.path_at(run_dir / "checkpoints", verdict.resume_step)
                       if verdict.resume_step is not None else None)
        record = run_record.load(run_dir)
        return workers.run(job, run_dir, run_dir / f"train.node-{cluster.node_rank}.log",
                           record, resume_from, port, rendezvous, echo,
                           restart_agreement(job, run_dir, port, run_record.SHARED, echo))
    # A run directory of this node's own: the same files node 0 writes in its own.
    if options.fresh:
        state = rundir.prepare(run_dir, local["identity"], fresh=True,
                               allow_changed=options.allow_changed)
        if state.moved_aside_to:
            local["lock"].follow(state.moved_aside_to)
    else:
        state = local["state"]
    with diskfull.told_as_full(run_dir):
        cache = run_files.build_data_cache(job, run_dir, model, dataset, eval_dataset, echo,
                                           local["lock"], state.moved_aside_to)
    checkpoint, notes = agreed_checkpoint(job, run_dir, state, verdict.resume_step)
    notes += rundir.set_aside_torn(run_dir, state)
    if checkpoint is not None:
        notes.insert(0, f"resuming {run_dir} from {checkpoint.path.name}")
    with diskfull.told_as_full(run_dir):
        record = run_files.write(job, run_dir, dataset, eval_dataset, local["identity"], argv,
                                 rendezvous, model, nodes_record(job, verdict), cache)
    rundir.clear_stop_record(run_dir)
    workers.log_notes(run_dir / "train.log", notes, echo)
    return workers.run(job, run_dir, run_dir / "train.log", record,
                       checkpoint.path if checkpoint else None, port, rendezvous, echo,
                       restart_agreement(job, run_dir, port, run_record.NODE_LOCAL, echo))


def agreed_checkpoint(job: Job, run_dir: Path, state, step: int | None):
    """Node-local run directories: (this node's copy of the checkpoint every node holds,
    or None; notes). Newer ones are set aside: those steps are trained again."""
    notes = rundir.set_aside_newer(run_dir, state, step)
    checkpoint = next((c for c in state.complete if c.step == step), None)
    if checkpoint is not None:
        notes += resume_rules.check_resume(checkpoint, job.plan, job.recipe, job.options.allow_changed)
    return checkpoint, notes


def nodes_record(job: Job, verdict: meeting.Verdict | None) -> dict:
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


def restart_agreement(job: Job, run_dir: Path, port: int, storage: str, echo):
    """How this node agrees on an in-job restart with the others: the
    `agree(refusal, failure)` -> restarts.Agreement that workers.run calls after a failure.

    The nodes meet as they did before the first launch, on --master-port (torchrun's
    store is gone with the workers). Every node whose workers failed says whether it
    would restart (its hello's error is its refusal) and what failed there; node 0
    restarts them only if all would, from the checkpoint every node holds, and names
    the one failure that was not a peer's consequence (only node 1 sees its own rank
    die). A node that does not come back within --join-timeout (its machine is gone)
    ends the restart: every node stops with the failure's exit code, and a re-run (a
    scheduler's requeue) resumes. No node hangs: node 0 stops waiting at the timeout,
    and a joining node whose node 0 does not answer stops as well."""
    cluster = job.cluster
    # A node's ranks may notice a peer's death only when their collective times out
    # (NCCL, with async error handling) or the stall watch ends them, whichever is first:
    # the nodes wait that long for each other, plus --join-timeout.
    noticed = min(run_files.collective_timeout_s(job), job.options.stall_timeout_s or float("inf"))
    timeout = job.options.join_timeout_s + noticed
    tidies = storage == run_record.NODE_LOCAL or cluster.node_rank == 0

    def own_checkpoints():
        """This node's checkpoints, scanned (every file's checksum) once per restart, by
        the nodes that report their steps or tidy: all but a shared directory's joiners."""
        return checkpoints.scan(run_dir / "checkpoints") if tidies else None

    def own_hello(refusal: str | None, failure: restarts.Failure, found) -> dict:
        shared = storage == run_record.SHARED
        steps = None if found is None else [c.step for c in found.complete]
        return {**_own_hello(job, run_dir, shared, steps, None, error=refusal),
                "failure": failure.cause()}

    def agreed(verdict: meeting.Verdict, refusal: str | None, found) -> restarts.Agreement:
        if not verdict.ok:
            return restarts.Agreement(False, notes=() if refusal else (verdict.message,))
        checkpoint, notes = _restart_checkpoint(run_dir, verdict.resume_step, storage, found)
        return restarts.Agreement(True, checkpoint, tuple(notes), verdict.cause)

    def as_node_zero(refusal: str | None, failure: restarts.Failure) -> restarts.Agreement:
        found = own_checkpoints()
        mine = own_hello(refusal, failure, found)
        chosen: list[restarts.Agreement] = []

        def decide(others: list[dict]) -> meeting.Verdict:
            if refusal:
                return meeting.Verdict(False, f"node 0 does not restart: {refusal}")
            refusing = [f"node {o['node_rank']} does not restart: {o['error']}"
                        for o in others if o.get("error")]
            if refusing:
                return meeting.Verdict(False, "; ".join(refusing))
            cause = restarts.first_cause([h.get("failure") for h in [mine, *others]])
            return dataclasses.replace(meeting.decide([mine, *others]), cause=cause)

        try:
            verdict = meeting.serve(cluster.master_addr, port, cluster.nnodes,
                                    os.urandom(8).hex(), timeout, decide,
                                    lambda v: chosen.append(agreed(v, refusal, found)),
                                    log=echo, timeout_name=_RESTART_WAIT)
        except UserError as exc:
            return _not_met(exc)
        return chosen[0] if verdict.ok else agreed(verdict, refusal, found)

    def as_joining_node(refusal: str | None, failure: restarts.Failure) -> restarts.Agreement:
        found = own_checkpoints()
        try:
            verdict = meeting.join(cluster.master_addr, port, timeout,
                                   lambda _launch: own_hello(refusal, failure, found), log=echo,
                                   verdict_timeout_s=timeout + _DECIDING_S,
                                   timeout_name=_RESTART_WAIT)
        except UserError as exc:
            return _not_met(exc)
        return agreed(verdict, refusal, found)

    return as_node_zero if cluster.node_rank == 0 else as_joining_node


# How long node 0 may take, once every node has come, to verify the checkpoints it
# restarts from (a SHA-256 of each file) before it answers.
_DECIDING_S = 600.0
# What a restart meeting's timeout is made of, as its messages name it.
_RESTART_WAIT = ("--join-timeout, plus the time a node's ranks may need to notice the "
                 "failure: the stall or collective timeout")


def _not_met(exc: UserError) -> restarts.Agreement:
    """The meeting's own first sentence (which node did not come, or that node 0 did not
    answer); its advice is about starting the nodes, not about a restart."""
    first = str(exc).split(". ")[0].rstrip(".")
    return restarts.Agreement(False, notes=(
        f"the nodes did not meet to restart ({first}); that node's machine or launcher is "
        "likely gone. Once every node is back, re-run the same command on each to resume",))


def _restart_checkpoint(run_dir: Path, step: int | None, storage: str, found):
    """(this node's checkpoint at the agreed step, notes). `found`: this node's scan of
    its checkpoints when it tidies them (node 0 of a shared run directory; every node
    with node-local ones): it sets aside the torn ones, and with node-local ones those
    newer than the agreed step."""
    root = run_dir / "checkpoints"
    notes: list[str] = []
    if found is not None:
        notes += rundir.set_aside_torn(run_dir, found)
        if storage == run_record.NODE_LOCAL:
            notes += rundir.set_aside_newer(run_dir, found, step)
    return (checkpoints.path_at(root, step) if step is not None else None), notes
