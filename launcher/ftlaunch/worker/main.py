"""The shared SFT module every strategy launches: `python -m ftlaunch.worker.main --run-dir DIR`.

The worker is the only place that touches the Trainer. Everything it needs was
decided and validated by the launcher and written to run.yaml; a worker only
reads it, so all ranks train the same thing and no rank can disagree about
the plan. Rank 0 writes the run files; every rank writes one line about
itself in ranks/, which is how tests see that all ranks trained together.

This module is the life of one training (run): the stop request installed first, the
trainer built (setup.build), trained, then either stopped (stopping.record_stop) or
finished (rank_report.write_rank_report, finish.save_adapter, loss.png).
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

from ftlaunch.quiet import silence_library_noise

from ftlaunch.errors import exit_quickly
from ftlaunch.run import checkpoints
from ftlaunch.run import directory as rundir
from ftlaunch.run import heartbeat as heartbeat_mod
from ftlaunch.run import rank_logs
from ftlaunch.run import record as run_record
from ftlaunch.worker.checkpointing import barrier
from ftlaunch.worker.finish import save_adapter, trim_metrics
from ftlaunch.worker.rank_report import write_rank_report
from ftlaunch.worker.setup import build
from ftlaunch.worker.stopping import StopRequest, record_stop, watch_launcher


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftlaunch.worker.main")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--resume-from", type=Path, default=None)
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    rank_logs.prepare(run_dir)
    silence_library_noise()
    try:
        run(run_dir, args.resume_from)
    except BaseException as exc:
        code = rank_logs.fail(run_dir, exc)  # recorded; a full disk or a peer's fault told in one line
        if code is None:
            raise
        return code
    return 0


def run(run_dir: Path, resume_from: Path | None) -> None:
    stop = StopRequest()
    stop.install()  # first thing: a signal during model loading must not kill this rank
    import faulthandler

    # The launcher asks for every thread's stack this way when the job stalls; it is
    # written from the signal handler itself, so even a rank stuck in C code answers.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    record = run_record.load(run_dir)
    watch_launcher(stop, float(record.checkpointing.grace_s))
    session = build(run_dir, stop)
    trainer, recorder, tokenizer = session.trainer, session.recorder, session.tokenizer
    if trainer.is_world_process_zero():  # a run killed before its first checkpoint starts over
        trim_metrics(run_dir / "metrics.jsonl", checkpoints.step_of(resume_from) if resume_from else 0)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    # Who writes the run directory's files: global rank 0, or with node-local run
    # directories every node's first rank (save_on_each_node), each into its own copy.
    writes_run_files = trainer.args.should_save
    stopped_at = session.checkpointing.stopped_at
    if stopped_at is None and stop.reason == rundir.NON_FINITE_STOP:
        stopped_at = trainer.state.global_step  # found in the last step's logged loss
    if stopped_at is not None:  # the stop's checkpoint is complete: on_save waited for all ranks
        if writes_run_files:
            checkpoints.clear_incoming(run_dir / "checkpoints")
            record_stop(run_dir, stop, stopped_at, session.checkpointing.guard)
        # No node's launcher may look for stopped.json before it is there.
        barrier()
        return
    session.heartbeat.beat(trainer.args, trainer.state, heartbeat_mod.FINISHING)

    write_rank_report(run_dir, trainer, recorder, result, time.time() - started)
    evaluated = {row["step"] for row in trainer.state.log_history if "eval_loss" in row}
    if trainer.eval_dataset is not None and trainer.state.global_step not in evaluated:
        trainer.evaluate()  # the final adapter's eval loss, logged like the others
    save_adapter(trainer, tokenizer, run_dir / "adapter")
    trainer.accelerator.wait_for_everyone()
    if writes_run_files:
        checkpoints.clear_incoming(run_dir / "checkpoints")  # only TRL's model card is left there
    if trainer.is_world_process_zero():
        from ftlaunch.show.plot import run_title, write_loss_png

        try:
            write_loss_png(run_dir / "metrics.jsonl", run_dir / "loss.png",
                           title=run_title(record.model.name, record.strategy))
        except Exception as exc:  # a picture is not worth failing a finished training for
            print(f"ftlaunch: could not write loss.png: {exc}", flush=True)
        print(f"ftlaunch: training finished, adapter in {run_dir / 'adapter'}", flush=True)


if __name__ == "__main__":
    exit_quickly(main())
