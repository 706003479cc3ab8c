"""The files a training leaves at its end: adapter/ (written whole or not at all), and on
resume metrics.jsonl cut back to the checkpoint's step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ftlaunch import filemodes
from ftlaunch.files import atomic_write
from ftlaunch.worker import fsdp_checkpoint
from ftlaunch.worker.rank_report import is_zero3


def save_adapter(trainer, tokenizer, target: Path) -> None:
    """Every rank calls this; rank 0 writes.

    Written beside and renamed: a run counts as finished only when adapter/ is whole.
    Collecting the adapter is collective on sharded engines, so every rank takes part:
    ZeRO-3 through the Trainer's save_model (stage3_gather_16bit_weights_on_model_save
    gathers the trainable weights), FSDP through fsdp_checkpoint.save_adapter (a full
    state dict gathered unit by unit; checkpoints are SHARDED_STATE_DICT, the adapter
    file must be whole).
    """
    staging = target.with_name(".adapter.tmp")
    main = trainer.args.should_save  # rank 0, or each node's first with node-local run dirs
    if trainer.is_fsdp_enabled:
        # Gathered whole on global rank 0 only (ftlaunch refuses FSDP with node-local
        # run directories, so no other node writes one).
        fsdp_checkpoint.save_adapter(trainer.model_wrapped,
                                     trainer.accelerator.unwrap_model(trainer.model_wrapped),
                                     staging, write=trainer.is_world_process_zero())
        main = trainer.is_world_process_zero()
    elif is_zero3(trainer):
        trainer.save_model(str(staging))
        if main:
            (staging / "training_args.bin").unlink(missing_ok=True)
    elif main:
        trainer.model.save_pretrained(staging)
    if not main:
        return
    # DPO from a starting adapter: peft saves every adapter, so the frozen reference copy
    # too (ref/). The run's adapter is the policy alone; the reference is in start-adapter/.
    shutil.rmtree(staging / "ref", ignore_errors=True)
    tokenizer.save_pretrained(staging)
    filemodes.follow_umask(staging)  # safetensors wrote the weights 0600
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def trim_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint: those steps run again. A line
    cut short by a hard kill is dropped too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write(path, "".join(line + "\n" for line in kept))
