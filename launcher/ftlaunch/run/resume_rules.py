"""What a resume does with each changed training setting: one table, used and documented.

A resume restores more than the weights: the optimizer's state and hyperparameters, the
scheduler's peak rate and step, the Trainer's logging/saving/evaluation intervals, the
RNG states and the place in the data. So a setting changed since the checkpoint could be
used, be silently overridden by that state, or make the checkpoint mean something else.
Here each one either takes effect from the resumed step (the worker makes sure of it where
the Trainer alone would not: worker.callbacks.ResumedSettings) or is refused with exit 2 before
anything is written, so that run.yaml records only what is used. check_resume
compares run.yaml's recipe with the new one; docs/RESUME.md shows the same table.

What the data becomes (model, LoRA shape, data, sequence length, system prompt, packing,
format, loss mask) is the run's identity instead, compared by run.directory.prepare.
"""

from __future__ import annotations

import math

from ftlaunch.run import checkpoints
from ftlaunch.run import directory as rundir
from ftlaunch.run import record as run_record
from ftlaunch.errors import UserError

_OPTIMIZER_STATE = ("the checkpoint's optimizer state brings back the old value with it, "
                    "so the new one would be ignored")
_DATA_ORDER = ("the data order (and an --eval-split's held-out rows) follow it, so the "
               "resumed step would count into a different order")

# Refused on resume, and why.
REFUSED = {
    "optim": "the checkpoint's optimizer state is the old optimizer's and would not load",
    "optim_args": "the checkpoint's optimizer state is the old optimizer's and would not load",
    "optim_target_modules": "the checkpoint's optimizer state is the old optimizer's and "
                            "would not load",
    "weight_decay": _OPTIMIZER_STATE,
    "adam_beta1": _OPTIMIZER_STATE,
    "adam_beta2": _OPTIMIZER_STATE,
    "adam_epsilon": _OPTIMIZER_STATE,
    "seed": _DATA_ORDER,
    "data_seed": _DATA_ORDER,
}

_NEW_SHAPE = ("the new schedule's shape takes over at step {step} (the rate may step "
              "there to what the new schedule gives)")
_NEW_TOTAL = "the schedule now spans the new total, continuing from step {step}"
# Take effect from the resumed step, in a way worth saying (learning_rate: see notes()).
AS_FOLLOWS = {
    "learning_rate": "the schedule continues from step {step} with peak {new}",
    "lr_scheduler_type": _NEW_SHAPE,
    "lr_scheduler_kwargs": _NEW_SHAPE,
    "warmup_steps": _NEW_SHAPE,
    "warmup_ratio": _NEW_SHAPE,
    "max_steps": _NEW_TOTAL,
    "num_train_epochs": _NEW_TOTAL,
}
# Schedulers that are not a function of the step (their state is their own): a change
# from or to one would load one kind of scheduler's state into another.
_STATEFUL_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")

# Everything else is free: read afresh at every step (max_grad_norm, ...), or only about
# logging, saving, evaluation and the launch (logging_steps, save_steps and eval_steps too:
# take_effect puts the new ones in place of those in the checkpoint's trainer_state.json).


def notes(before: dict, after: dict, step: int) -> list[str]:
    """One note per changed training setting that takes effect from `step`, the
    checkpoint's; a UserError naming every refused one and the way out."""
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    refused = {k: REFUSED[k] for k in changed if k in REFUSED}
    schedulers = {before.get("lr_scheduler_type"), after.get("lr_scheduler_type")}
    if "lr_scheduler_type" in changed and schedulers & set(_STATEFUL_SCHEDULERS):
        refused["lr_scheduler_type"] = ("a reduce_lr_on_plateau or greedy scheduler's state is "
                                        "its own; it does not carry over to another kind")
    if "learning_rate" in changed and schedulers & set(_STATEFUL_SCHEDULERS):
        # Such a scheduler keeps its own rates (no base_lrs to scale): take_effect could
        # not apply the new peak, and announcing it would be a lie.
        refused["learning_rate"] = ("a reduce_lr_on_plateau or greedy scheduler keeps its "
                                    "own rates in its state")
    if refused:
        keep = " ".join(f"--set {k}={before[k]}" if before.get(k) is not None
                        else f"(no {k} setting)" for k in refused)
        raise UserError(
            f"The checkpoint at step {step} cannot continue with changed "
            + "; ".join(f"{k} (was {before.get(k)!r}, now {after.get(k)!r}: {why})"
                        for k, why in refused.items())
            + f". Resume with the recorded value{'s' if len(refused) > 1 else ''} ({keep}), "
            "or pass --fresh to move this run aside and start over with the new settings.")
    out = []
    for key in changed:
        old, new = before.get(key), after.get(key)
        if key == "learning_rate" and isinstance(old, float) and isinstance(new, float):
            out.append(f"learning rate changed from {old:g} to {new:g}: "
                       + AS_FOLLOWS[key].format(step=step, new=f"{new:g}"))
        elif key in AS_FOLLOWS:
            out.append(f"{key} changed from {old!r} to {new!r}: "
                       + AS_FOLLOWS[key].format(step=step, new=new))
        else:
            out.append(f"{key} changed from {old!r} to {new!r}: used from step {step} on")
    return out


def take_effect(args, state, optimizer, lr_scheduler) -> str | None:
    """In the worker, once the Trainer has restored a checkpoint: put back what the table
    says takes effect but the restored state would override. The logging, evaluation and
    saving intervals come back with trainer_state.json; the learning rate's peak with the
    scheduler's base_lrs and each optimizer group's lr and initial_lr. The peak is scaled,
    not reset, so warmup and decay go on from the current step with the new peak (the
    schedule's shape, max_steps and warmup are the new ones already: the Trainer builds
    the schedule from the new arguments and restores only its step and base_lrs).
    Returns the line to print when the rate changed (the launcher announced it already;
    this says the worker did it)."""
    state.compute_steps(args, state.max_steps)
    old = max(getattr(lr_scheduler, "base_lrs", None) or [0.0])
    new = args.learning_rate
    if optimizer is None or not old or math.isclose(old, new, rel_tol=1e-9):
        return None
    ratio = new / old
    lr_scheduler.base_lrs = [lr * ratio for lr in lr_scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return (f"schedule peak set to {new:g} at step {state.global_step} (the checkpoint's "
            f"was {old:g})")


def check_resume(checkpoint, plan, recipe, allow_changed: tuple[str, ...]) -> list[str]:
    """Whether a checkpoint can continue under this plan: a UserError (exit 2) when it
    cannot, else the notes on what differs.

    The global batch (micro-batch x accumulation x processes) must stay what it was so
    that a step, the learning-rate schedule and the samples seen mean the same; the
    process count may change, except for DeepSpeed's per-rank ZeRO partitions."""
    was = checkpoint.manifest
    name = checkpoint.path.name
    fmt = checkpoints.format_of(plan.engine)
    if was.get("format") != fmt:
        raise UserError(
            f"{name} was written by a {was.get('engine')} run; this plan trains with "
            f"{plan.engine}, which cannot load it. Resume with the original --engine / --gpus, "
            "or pass --fresh to start over.")
    max_steps = int(recipe.training.get("max_steps") or -1)
    if 0 < max_steps <= checkpoint.step:
        raise UserError(f"{name} is at step {checkpoint.step}, not before --max-steps {max_steps}: "
                        "there is nothing left to train. Raise --max-steps, or pass --fresh.")
    said = []
    if was.get("global_batch_size") != plan.global_batch_size and "global_batch" not in allow_changed:
        raise UserError(
            f"{name} was trained with a global batch of {was.get('global_batch_size')} "
            f"({was.get('world_size')} processes x micro-batch {was.get('per_device_batch_size')} x "
            f"accumulation {was.get('gradient_accumulation_steps')}); this plan's is "
            f"{plan.global_batch_size}. Use --global-batch-size {was.get('global_batch_size')} "
            "(and a process count it divides over), or --set resume.allow_changed=global_batch.")
    if was.get("world_size") != plan.num_processes:
        # FSDP's checkpoints are torch distributed checkpoints: loading reshards them.
        # DeepSpeed's ZeRO partitions are per rank (its universal-checkpoint conversion
        # is not wired in yet).
        if fmt == "deepspeed":
            raise UserError(
                f"{name} holds DeepSpeed ZeRO partitions for {was.get('world_size')} processes "
                f"(one per rank); ftlaunch cannot yet load them on {plan.num_processes}. Resume "
                f"with {was.get('world_size')} processes (`ftlaunch resume "
                f"{checkpoint.path.parent.parent} --gpus {was.get('world_size')}`, on this "
                "machine or another), or pass --fresh to start over. --engine fsdp checkpoints "
                "do reshard.")
        said.append(
            f"{name} was written by {_processes(was.get('world_size'))} (micro-batch "
            f"{was.get('per_device_batch_size')} x accumulation "
            f"{was.get('gradient_accumulation_steps')}); resuming on {plan.num_processes} (micro-batch "
            f"{plan.per_device_batch_size} x accumulation {plan.gradient_accumulation_steps}), global "
            f"batch {plan.global_batch_size}, {was.get('samples_seen')} samples seen so far")
    # The training settings of the launch before this one: run.yaml is rewritten only
    # once every check here has passed.
    run_dir = checkpoint.path.parent.parent
    recorded = run_record.load(run_dir).training_settings if run_record.exists(run_dir) else {}
    if recorded:
        said += notes(recorded, recipe.training, checkpoint.step)
    return said


def _processes(count) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"
