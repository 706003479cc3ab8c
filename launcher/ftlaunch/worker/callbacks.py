"""The Trainer callbacks that watch a training without steering it: metrics.jsonl and the
progress line (MetricsCallback), the launcher's heartbeat (Heartbeat), the batches'
fingerprint (BatchRecorder, a collator wrapper), and the settings a resume overrides
(ResumedSettings)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback

from ftlaunch.run import heartbeat as heartbeat_mod
from ftlaunch.run import resume_rules
from ftlaunch.show.progress import progress_line
from ftlaunch.worker import peak_memory


class MetricsCallback(TrainerCallback):
    """metrics.jsonl on rank 0, one line per logged step (and per evaluation), and a
    readable line on stdout.

    trained_tokens_per_s: tokens with a label (the ones the loss is on) per second,
    over all ranks: TRL's num_tokens (input tokens, summed over ranks) times the
    labelled fraction of the batches this rank collated. (Counting at collation
    alone would be early by the batch the dataloader prefetches.)
    """

    def __init__(self, path: Path):
        self.path = path
        self.recorder = None
        self._since = (time.time(), 0)
        self._began = (time.time(), 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self._since = (time.time(), 0.0)
        self._began = (time.time(), state.global_step)  # a resume starts mid-way
        peak_memory.reset()  # the peaks logged are training's, not loading's

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" not in logs and "eval_loss" not in logs:
            return
        now = time.time()
        row = {"step": state.global_step, "time": round(now, 3)}
        row.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
        if "loss" in logs:
            then, tokens_then = self._since
            tokens = float(logs.get("num_tokens", 0.0))
            recorder = self.recorder
            fraction = recorder.trained_tokens / recorder.tokens if recorder and recorder.tokens else 0
            if now > then and tokens > tokens_then:
                row["tokens_per_s"] = round((tokens - tokens_then) / (now - then), 1)
                row["trained_tokens_per_s"] = round((tokens - tokens_then) * fraction
                                                    / (now - then), 1)
            self._since = (now, tokens)
            row.update(peak_memory.read())
            line = progress_line(state.global_step, state.max_steps, logs["loss"],
                                 logs.get("learning_rate", 0), row.get("tokens_per_s"),
                                 now - self._began[0], state.global_step - self._began[1])
            line += _rewards(logs, "")
        elif "eval_rewards/accuracies" in logs or "eval_kl" in logs:
            # DPO, KTO: their loss is no language model's; the rewards say more.
            line = (f"step {state.global_step}/{state.max_steps}  eval loss "
                    f"{logs['eval_loss']:.4f}{_rewards(logs, 'eval_')}")
        else:
            row["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
            line = (f"step {state.global_step}/{state.max_steps}  eval loss "
                    f"{logs['eval_loss']:.4f}  perplexity {row['eval_perplexity']:.2f}")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(line, flush=True)


class Heartbeat(TrainerCallback):
    """This rank's progress for the launcher's stall watch (ftlaunch.run.heartbeat)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.writer = None

    def beat(self, args, state, phase: str = "training") -> None:
        if self.writer is None:
            self.writer = heartbeat_mod.Writer(self.run_dir, args.process_index)
        self.writer.beat(state.global_step, phase)

    def on_train_begin(self, args, state, control, **kwargs):
        self.beat(args, state)

    def on_step_end(self, args, state, control, **kwargs):
        self.beat(args, state)

    def on_substep_end(self, args, state, control, **kwargs):  # a micro-batch of accumulation
        self.beat(args, state)

    def on_prediction_step(self, args, state, control, **kwargs):
        self.beat(args, state, "evaluating")

    def on_save(self, args, state, control, **kwargs):
        self.beat(args, state)


def _rewards(logs: dict, prefix: str) -> str:
    """DPO: how often chosen outscores rejected, and by how much; KTO: the margin between
    desirable and undesirable rewards, and the KL estimate they are measured against."""
    parts = [(label, logs.get(prefix + key)) for label, key in
             (("reward acc", "rewards/accuracies"), ("margin", "rewards/margins"),
              ("kl", "kl"))]
    if parts[0][1] is None and parts[2][1] is None:
        return ""  # SFT
    return "".join(f"  {label} {value:.3f}" for label, value in parts
                   if isinstance(value, (int, float)))


class BatchRecorder:
    """Wraps the collator to fingerprint the batches this rank trained on."""

    def __init__(self, collator):
        self.collator = collator
        self.digest = hashlib.sha256()
        self.batches = 0
        self.tokens = 0
        self.trained_tokens = 0

    def __call__(self, features):
        batch = self.collator(features)
        ids = batch["input_ids"]
        self.digest.update(ids.cpu().numpy().tobytes())
        self.batches += 1
        self.tokens += int(ids.numel())
        # SFT marks the loss in its labels; DPO's preference collator in a completion mask.
        trained = (batch["labels"] != -100 if "labels" in batch
                   else batch["completion_mask"] != 0)
        self.trained_tokens += int(trained.sum())
        return batch


class ResumedSettings(TrainerCallback):
    """On resume, the settings the checkpoint's state would override (see
    ftlaunch.run.resume_rules.take_effect). on_train_begin runs after the Trainer has loaded
    the checkpoint's optimizer, scheduler and trainer state, so the new values win."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if state.global_step == 0:
            return  # a new run: nothing was restored
        note = resume_rules.take_effect(args, state, optimizer, lr_scheduler)
        if note and state.is_world_process_zero:
            print(f"ftlaunch: {note}", flush=True)
