"""The Trainer's arguments (TRL's SFTConfig, DPOConfig or KTOConfig keywords, the recipe's
objective says which) for a plan and a recipe, resolved
by the launcher and written into the run record: the worker only adds its output_dir.

Pure, no torch (config_fields reads its shipped table; only with other library versions
does it ask trl): what the workers will train with is visible in run.yaml before any of
them starts, and every rank reads the same settings. A worker renames only the
checkpointing keys, to its own transformers' names (worker.setup).
"""

from __future__ import annotations

from ftlaunch.plan import config_fields
from ftlaunch.plan import objectives
from ftlaunch.plan.planner import Plan
from ftlaunch.plan.recipe import Recipe, eval_defaults, packing, seed


def trainer_arguments(plan: Plan, recipe: Recipe, *, evaluates: bool, node_local: bool,
                      timeout_s: int) -> dict:
    """The objective's config's keyword arguments except output_dir. Precedence, lowest first:
    ftlaunch's defaults, the recipe's training section (and --set), what the plan decides
    (recipe.PLAN_OWNED refuses those keys in a recipe)."""
    training = dict(recipe.training)
    training.setdefault("ddp_timeout", timeout_s)
    # Retention is ours (run.checkpoints.retain): it only ever deletes after a newer
    # checkpoint is complete.
    training.pop("save_total_limit", None)
    # Paged AdamW rides out memory spikes on a GPU (QLoRA paper); it needs CUDA.
    training.setdefault("optim", "adamw_torch" if plan.on_cpu else "paged_adamw_32bit")
    training["seed"] = seed(recipe.training)
    if evaluates:
        training = {**eval_defaults(training), **training}
        training.setdefault("per_device_eval_batch_size", plan.per_device_batch_size)
    # transformers 5.2x renamed gradient_checkpointing; older 5.x only has the old name.
    prefix = ("activation" if "activation_checkpointing" in config_fields.fields("training")
              else "gradient")
    planned = {
        f"{prefix}_checkpointing": plan.gradient_checkpointing,
        f"{prefix}_checkpointing_kwargs": {"use_reentrant": False},
        # Run directories on each node's own disk: every node keeps whole checkpoints.
        "save_on_each_node": node_local,
        "per_device_train_batch_size": plan.per_device_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "max_length": plan.seq_len,
        # CPU ranks: DDP and FSDP run as accelerate's CPU type (gloo); DeepSpeed instead
        # runs its CPU accelerator under its own type, with the backend named.
        "use_cpu": plan.on_cpu and plan.engine != "deepspeed",
        "bf16": plan.precision == "bf16",
        "fp16": plan.precision == "fp16",
        # DeepSpeed without a GPU needs the backend named: accelerate only works it out
        # for CUDA, and without one it would count a single process (and the Trainer's
        # batch arithmetic would disagree with ds_config.json).
        "ddp_backend": "gloo" if plan.engine == "deepspeed" and plan.on_cpu else None,
    }
    objective = objectives.get(recipe.objective)
    if objective is objectives.SFT:
        planned.update({
            # Loss only on what the model should learn to write (the assistant's turns of a
            # conversation, the completion of a prompt/completion pair): the data cache's
            # labels already say so; TRL takes them as they are, and refuses
            # assistant_only_loss on tokenized data.
            "assistant_only_loss": False,
            "completion_only_loss": False,
            # Best-fit packing, padding-free: examples share a row without attending to each
            # other (position_ids restart per example), and no compute goes to padding.
            "packing": packing(recipe.data),
        })
    elif objective is objectives.DPO:
        # max_length cuts prompt + completion, keeping the start (DPOConfig's default): a
        # pair whose prompt alone fills it is left out, as DPOTrainer leaves it out.
        planned["truncation_mode"] = "keep_start"
    # KTO: its collator keeps the start too (KTOConfig has no other mode), and its sampler
    # stays KTOConfig's sequential one (objectives.KTO refuses another).
    # ftlaunch's defaults, which a recipe or --set may change (report_to: --report-to).
    return {**objective.trainer_defaults,
            "ddp_find_unused_parameters": False if plan.num_processes > 1 else None,
            **training, **planned}
