"""Complete checkpoints, agreed on by every rank at every optimizer step (Checkpointing),
and the barrier the ranks meet at around a save and a stop."""

from __future__ import annotations

import time
from pathlib import Path

from transformers import TrainerCallback

from ftlaunch.run import checkpoints
from ftlaunch.run import record as run_record
from ftlaunch.worker.stopping import NON_FINITE, NonFiniteGuard, StopRequest


def _agreement_device():
    """Where the ranks' per-step flags are reduced, or None on one process."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class Checkpointing(TrainerCallback):
    """Complete checkpoints only (ftlaunch.run.checkpoints), every save_steps and every
    --save-every, and a stop with a checkpoint at the same step on every rank.

    The last step writes no checkpoint: adapter/ is written right after it, and a
    checkpoint at max_steps would be one a resume must never train from (the Trainer
    would run a step past the end)."""

    def __init__(self, run_dir: Path, record: run_record.RunRecord, stop: StopRequest,
                 guard: NonFiniteGuard):
        self.root = run_dir / "checkpoints"
        self.keep = record.checkpointing.keep
        self.save_every = record.checkpointing.save_every_s
        self.record = record
        self.stop = stop
        self.guard = guard
        self.stopped_at: int | None = None
        self._reason = "steps"
        self._last_save = time.monotonic()
        self._device = None  # of the per-step agreement; None on one process
        self._agreed: tuple[int, bool] | None = None  # this step's, until its end

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_save = time.monotonic()
        self._device = _agreement_device()

    def _agree(self, save_due: bool) -> tuple[int, bool]:
        """(stop reason code, save) as every rank sees it: the ranks' stop requests (the
        highest code; the guard's finding is one), rank 0's clock. One tiny all-reduce per
        optimizer step, on every rank at the same step, so all ranks skip a bad update,
        stop and checkpoint at the same step."""
        if self._device is None:
            return self.stop.code, save_due
        import torch
        import torch.distributed as dist

        flags = torch.tensor([self.stop.code, int(save_due and dist.get_rank() == 0)],
                             device=self._device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return int(flags[0]), bool(flags[1])

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """Agree before the update: a non-finite gradient on any rank must stop it on all."""
        due = bool(self.save_every) and time.monotonic() - self._last_save >= self.save_every
        self._agreed = self._agree(due)
        if self._agreed[0] == StopRequest.REASONS.index(NON_FINITE) and self.guard.checks_gradients:
            self.guard.skip_update(state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        stop, due = self._agreed if self._agreed is not None else self._agree(False)
        self._agreed = None
        last = state.global_step >= state.max_steps
        non_finite = stop == StopRequest.REASONS.index(NON_FINITE)
        if last and not non_finite:
            control.should_save = False
            return
        if stop:
            self.stopped_at = state.global_step
            self.stop.code = stop  # the reason every rank agreed on
            # After a non-finite loss only weights whose bad update was skipped are saved,
            # and never at max_steps (see the class docstring).
            save = not non_finite or (self.guard.kept_good and not last)
            control.should_training_stop = True
            control.should_save = save
            self._reason = "stop requested"
            if args.should_save:
                print(f"ftlaunch: stop requested ({self.stop.reason}): "
                      + (f"saving a checkpoint at step {state.global_step}" if save else
                         "not saving the weights at this step"), flush=True)
        elif due:
            control.should_save = True
            self._reason = "time"
        else:
            self._reason = "steps"

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:  # save_strategy="epoch": same rule
            control.should_save = False

    def on_save(self, args, state, control, **kwargs):
        barrier()  # every rank has written its part (its RNG state, its shards)
        staging = self.root / checkpoints.INCOMING / f"checkpoint-{state.global_step}"
        if args.should_save and staging.is_dir():
            target = checkpoints.finalize(staging, self.root, self._manifest(args, state))
            checkpoints.retain(self.root, self.keep)
            print(f"ftlaunch: {target.name} complete ({self._reason})", flush=True)
        barrier()
        self._last_save = time.monotonic()

    def _manifest(self, args, state) -> dict:
        import datetime as dt

        record = self.record
        global_batch = record.strategy.global_batch  # the world is the plan's (setup._check_world)
        return {
            "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "reason": self._reason,
            "world_size": args.world_size,
            "per_device_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "global_batch_size": global_batch,
            "samples_seen": state.global_step * global_batch,
            "max_steps": state.max_steps,
            "engine": record.strategy.engine,
            "format": record.strategy.checkpoint_format,
            "plan_hash": record.plan_hash,
            "data_fingerprint": record.data.fingerprint,
            "identity": record.identity,
            "versions": {k: v for k, v in record.versions.items() if k != "executable"},
        }
