"""How a worker stops early and says why: a signal or the launcher's exit (StopRequest,
watch_launcher), a NaN or inf loss (NonFiniteGuard), and stopped.json (record_stop).

The stop itself (finish the step, checkpoint at the same step on every rank) is
checkpointing.Checkpointing's.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from ftlaunch.run import checkpoints
from ftlaunch.run import directory as rundir


NON_FINITE = rundir.NON_FINITE_STOP


class StopRequest:
    """SIGTERM / SIGINT on this rank: finish the step, checkpoint, stop (see
    checkpointing.Checkpointing).

    Later signals are ignored here: torchrun's agent forwards the scheduler's signal
    again, and the launcher is the one that turns a second signal into a hard stop.
    The reason is a small number so that the ranks can agree on it with a max-reduce.
    """

    REASONS = (None, "SIGINT", "SIGTERM", "launcher exited", NON_FINITE)

    def __init__(self):
        self.code = 0

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        # The later reason wins, as between ranks (the max-reduce in
        # checkpointing.Checkpointing._agree): a non-finite loss, the highest, decides how
        # the stop saves.
        self.code = max(self.code, self.REASONS.index(reason))

    @property
    def reason(self) -> str | None:
        return self.REASONS[self.code]


def watch_launcher(stop: StopRequest, grace_s: float) -> None:
    """If the launcher dies without stopping us (SIGKILL, OOM killer), stop like on a
    signal: checkpoint at the next step; exit anyway after the grace period."""
    pid = int(os.environ.get("FTLAUNCH_LAUNCHER_PID", "0") or 0)
    if not pid:
        return
    import psutil

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    def watch() -> None:
        while not gone():
            time.sleep(2)
        stop.request("launcher exited")
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="ftlaunch-watchdog", daemon=True).start()


class NonFiniteGuard(TrainerCallback):
    """A NaN or inf loss stops the run before it poisons the weights.

    Before each optimizer step this rank's trainable gradients (LoRA's, a few MB) are
    checked; checkpointing.Checkpointing's per-step agreement carries the finding to every
    rank, and when any rank found one, every rank drops its gradients (skip_update), so
    the optimizer skips that update (torch's optimizers skip parameters without a gradient),
    and the run stops with a checkpoint of the weights as they were before it: the last
    good state. Where the gradients cannot be acted on (checks_gradients False: DeepSpeed,
    fp16) the logged loss is checked instead, and the run stops without saving: the last
    complete checkpoint is then the last good state."""

    def __init__(self, stop: StopRequest, checks_gradients: bool = True):
        self.stop = stop
        self.checks_gradients = checks_gradients
        self.step: int | None = None
        self.kept_good = False  # the update was skipped: the current weights are good
        self.found_in = ""
        self._params: list = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._params = [p for p in model.parameters() if p.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.checks_gradients or self.step is not None:
            return
        import torch

        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                 for p in self._params if p.grad is not None]
        # One reduction and one device sync for all of them, not one per tensor.
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            self._trip(state.global_step + 1, "gradients")

    def skip_update(self, step: int) -> None:
        """Every rank, once the ranks agreed that some rank's gradients are not finite."""
        for param in self._params:
            param.grad = None
        if self.step is None:
            self._trip(step, "gradients")  # another rank's shard was the one
        self.kept_good = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")  # gathered over the ranks: every rank sees it
        if isinstance(loss, (int, float)) and not math.isfinite(loss) and self.step is None:
            self._trip(state.global_step, "logged loss")
            # The save and evaluation that follow this log in the same step would keep or
            # judge weights that the bad update has already reached.
            control.should_save = control.should_evaluate = False
            return control

    def _trip(self, step: int, found_in: str) -> None:
        self.step, self.found_in = step, found_in
        self.stop.request(NON_FINITE)

    def report(self) -> dict:
        return {"non_finite_step": self.step, "found_in": self.found_in,
                "update_skipped": self.kept_good}


def record_stop(run_dir: Path, stop: StopRequest, step: int, guard: NonFiniteGuard) -> None:
    """stopped.json, which tells the launcher why the workers ended before max_steps and
    which complete checkpoint holds the state to go on from: the stop's own, or (when the
    weights at the stop were not worth saving) the last one before it."""
    newest = checkpoints.scan(run_dir / "checkpoints").newest
    record = {"step": step, "why": stop.reason,
              "checkpoint": str(newest.path) if newest else None}
    if stop.reason == NON_FINITE:
        record.update(guard.report())
    rundir.write_stop_record(run_dir, record)
    where = f"{newest.path.name} is complete" if newest else "no checkpoint was completed"
    print(f"ftlaunch: stopped ({stop.reason}) at step {step}; {where}", flush=True)
