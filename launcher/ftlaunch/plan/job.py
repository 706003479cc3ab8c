"""From command-line options to a planned job: model, recipe, hardware, plan.

`ftlaunch train` and `ftlaunch plan` share this, so the plan a user inspects
is exactly the plan that trains. Nothing here imports torch; --set keys are
checked against TRL/peft only when there are any (that import costs seconds).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ftlaunch.detect import cluster as cluster_mod
from ftlaunch.detect import hardware as hw
from ftlaunch.models import adapter as adapters
from ftlaunch.models import presets as models
from ftlaunch.plan import batch, objectives
from ftlaunch.plan import planner
from ftlaunch.plan import recipe as recipes
from ftlaunch.identity import RESUME_CHANGEABLE
from ftlaunch.stop_flags import DEFAULT_MAX_RESTARTS
from ftlaunch.errors import UserError


@dataclass(frozen=True)
class Options:
    model: str
    gpus: str = "auto"
    data: str | None = None
    recipe: str | None = None  # None: the objective's bundled recipe
    objective: str = "auto"  # auto: DPO for pairs, KTO for labelled completions, else SFT
    adapter: str | None = None  # --adapter: start from this LoRA adapter (or run's)
    output_dir: str | None = None
    method: str = "auto"
    engine: str = "auto"
    max_steps: int | None = None
    epochs: float | None = None
    seq_len: int | None = None
    global_batch_size: int | None = None
    sets: tuple[str, ...] = ()
    nnodes: int | None = None  # None: from SLURM / torchrun-style variables, else 1
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    random_init: bool = False
    gradient_checkpointing: bool | None = None  # None: the plan decides
    trust_remote_code: bool = False
    eval_split: float | None = None
    eval_data: str | None = None
    packing: bool | None = None  # None: the recipe's
    system_prompt: str | None = None
    hardware: str | None = None
    fresh: bool = False
    dry_run: bool = False
    grace_s: float = 120.0  # --grace: how long a stop on a signal may take to checkpoint
    save_every_s: float | None = None  # --save-every: a checkpoint at least this often
    join_timeout_s: float = 900.0  # --join-timeout: how long the nodes wait for each other
    stall_timeout_s: float | None = 1800.0  # --stall-timeout: no progress this long ends the job
    max_restarts: int = DEFAULT_MAX_RESTARTS  # --max-restarts: in-job restarts after a failure
    report_to: tuple[str, ...] | None = None  # --report-to: None keeps the recipe's
    allow_changed: tuple[str, ...] = ()  # --set resume.allow_changed=...: accepted differences



@dataclass(frozen=True)
class Job:
    options: Options
    model: models.ModelSpec
    recipe: recipes.Recipe
    hardware: hw.Hardware
    plan: planner.Plan
    output_dir: Path
    cluster: cluster_mod.ClusterContext
    spec: planner.TrainSpec | None = None  # what the plan was made from
    start_adapter: adapters.StartAdapter | None = None  # --adapter, checked


def resolve(options: Options, detect_output_dir: bool = True, validate: bool = True) -> Job:
    """validate=False skips checking the recipe against TRL/peft (a 4 s import) when
    nothing but a bundled recipe is used, which the test suite already validates."""
    options = _resume_settings(options)
    model = models.resolve(options.model)
    asked_recipe = recipes.load_recipe(options.recipe) if options.recipe else None
    cluster = cluster_mod.resolve(os.environ, options.nnodes, options.node_rank,
                                  options.master_addr, options.master_port)
    objective = _objective(options, asked_recipe, joining=cluster.node_rank > 0)
    recipe_name = options.recipe or objective.recipe
    recipe = asked_recipe or recipes.load_recipe(recipe_name)
    if recipe.objective != objective.name:
        raise UserError(f"--recipe {recipe_name} configures {recipe.objective.upper()} "
                        f"(objective: {recipe.objective}), but this run trains "
                        f"{objective.name.upper()} ({_objective_reason(options, objective)}). Give a "
                        f"{objective.name} recipe (--recipe {objective.recipe}) or leave "
                        "--recipe out.")
    output_dir = Path(options.output_dir or Path("runs") / _slug(model.name)).expanduser()
    start_adapter = None
    if options.adapter:  # a run that started from one goes on from its copy
        start_adapter = ((None if options.fresh else adapters.run_copy(options.adapter, output_dir))
                         or adapters.resolve(options.adapter))
    if start_adapter is not None:
        recipe = replace(recipe, lora={**recipe.lora, **start_adapter.lora_settings()})
        fixed = [a.partition("=")[0].strip() for a in options.sets
                 if a.partition("=")[0].strip().startswith("lora.")]
        if fixed:
            raise UserError(f"--set {fixed[0]}: the starting adapter (--adapter "
                            f"{options.adapter}) fixes the LoRA settings; a run goes on "
                            "with its rank, alpha, dropout and targets.")
    recipe = recipes.apply_overrides(recipe, options.sets)
    recipe = _apply_flags(recipe, options)
    recipe = _fit_context(recipe, model, options)
    if validate or options.sets or recipe_name not in recipes.recipe_paths():
        set_keys = frozenset(a.partition("=")[0].strip() for a in options.sets)
        recipe = recipes.validate(recipe, set_keys, recipe_name)
    if not objective.packs:  # preference examples are padded per batch by TRL's collator
        asked = options.packing or any(a.partition("=")[0].strip() == "data.packing"
                                       for a in options.sets)
        if asked and recipes.packing(recipe.data):
            raise UserError(f"{objective.name.upper()} does not pack: each example is padded "
                            f"in its batch by TRL's collator. Leave out --packing / "
                            "data.packing=true.")
        recipe = replace(recipe, data={**recipe.data, "packing": False})
    machine = _machine(options, cluster, output_dir if detect_output_dir else None)
    spec = planner.TrainSpec(
        seq_len=recipe.seq_len,
        global_batch_size=recipe.global_batch_size,
        method=recipe.method,
        engine=options.engine,
        processes_per_node=processes_per_node(options.gpus, machine),
        lora_rank=int(recipe.lora["r"]),
        lora_targets=_targets(recipe.lora["target_modules"]),
        # DPO's and KTO's trainers disable dropout (disable_dropout): no LoRA dropout copies.
        lora_dropout=(0.0 if objective.has_reference
                      and recipe.training.get("disable_dropout", True)
                      else float(recipe.lora["lora_dropout"])),
        gradient_checkpointing=options.gradient_checkpointing,
        full_logits=float(recipe.training.get("label_smoothing_factor") or 0) > 0,
        objective=objective.name,
        reference_forward=(objective.has_reference
                           and not recipe.training.get("precompute_ref_log_probs")),
        reference_adapter=objective.has_reference and start_adapter is not None,
    )
    plan = planner.plan(machine, model, spec)
    _check_engine(options, plan)
    batch.check(plan, asked=options.global_batch_size is not None)
    recipe = _learning_rate_for(recipe, plan, model, options)
    return Job(options=options, model=model, recipe=recipe, hardware=machine,
               plan=plan, output_dir=output_dir, cluster=cluster, spec=spec,
               start_adapter=start_adapter)


def _objective(options: Options, recipe: recipes.Recipe | None,
               joining: bool) -> objectives.Objective:
    """--objective, or on auto what the data holds (its first example: preference pairs
    train with DPO, labelled completions with KTO; pairs with KTO when a --recipe says
    so), else what a --recipe configures, else SFT."""
    if options.objective != "auto":
        return objectives.get(options.objective)
    if options.data:
        from ftlaunch.data import read

        fmt = dict(a.partition("=")[::2] for a in options.sets).get("data.format")
        fmt = (fmt or (recipe.data.get("format") if recipe else None) or "auto").strip()
        try:
            kind = read.peek_kind(options.data, fmt)
            if recipe and kind in objectives.get(recipe.objective).kinds:
                return objectives.get(recipe.objective)
            return objectives.for_kind(kind)
        except UserError:
            # A joining node may not see the data (node 0 reads it, on a shared run
            # directory): it plans with the recipe's objective, and the nodes' meeting
            # refuses a plan that differs from node 0's.
            if not joining:
                raise
    return objectives.get(recipe.objective) if recipe else objectives.SFT


def _objective_reason(options: Options, objective: objectives.Objective) -> str:
    if options.objective != "auto":
        return f"--objective {options.objective}"
    if not options.data:
        return "the bundled demo data"
    return f"--data {options.data} holds {objective.data}"


def _machine(options: Options, cluster: cluster_mod.ClusterContext,
             output_dir: Path | None) -> hw.Hardware:
    """This node's hardware (detected, or described by --hardware), times the nodes of the
    job. A described multi-node spec must agree with a multi-node context."""
    if not options.hardware:
        return hw.with_nodes(hw.detect(output_dir), cluster.nnodes)
    machine = hw.parse_spec(options.hardware)
    if machine.nodes == 1:
        return hw.with_nodes(machine, cluster.nnodes)
    if cluster.nnodes > 1 and machine.nodes != cluster.nnodes:
        raise UserError(f"--hardware {options.hardware} describes {machine.nodes} nodes, but "
                        f"{cluster.source} says {cluster.nnodes}. Describe one node "
                        f"(e.g. {machine.gpus_per_node}x...) and let the job's node count apply.")
    return machine


def _resume_settings(options: Options) -> Options:
    """`--set resume.allow_changed=data,seq_len` is the launcher's, not the recipe's."""
    sets, allowed = [], list(options.allow_changed)
    for assignment in options.sets:
        key, _, value = assignment.partition("=")
        if not key.strip().startswith("resume."):
            sets.append(assignment)
            continue
        if key.strip() != "resume.allow_changed":
            raise UserError(f"--set {key.strip()}: the only resume setting is resume.allow_changed "
                            f"(any of {', '.join(RESUME_CHANGEABLE)}, comma-separated).")
        names = [n.strip() for n in value.strip().strip("[]").split(",") if n.strip()]
        unknown = [n for n in names if n not in RESUME_CHANGEABLE]
        if unknown or not names:
            raise UserError(f"--set resume.allow_changed={value}: {', '.join(unknown) or 'nothing'} "
                            f"is not something a resume can allow to change; choose from "
                            f"{', '.join(RESUME_CHANGEABLE)}.")
        allowed += names
    return replace(options, sets=tuple(sets), allow_changed=tuple(dict.fromkeys(allowed)))


# LoRA on a 16-bit base of this size and up trains stably at half QLoRA's 2e-4
# (the LoRA/QLoRA tutorials' advice for 30B+ models).
_BIG_MODEL = 30e9


def _learning_rate_for(recipe: recipes.Recipe, plan: planner.Plan, model: models.ModelSpec,
                       options: Options) -> recipes.Recipe:
    """1e-4 instead of the default 2e-4 for LoRA on a big model, unless asked otherwise."""
    asked = any(s.split("=", 1)[0].strip() == "learning_rate" for s in options.sets)
    if (plan.method != "lora" or model.parameters < _BIG_MODEL or asked
            or recipe.training.get("learning_rate") != 2e-4):
        return recipe
    return replace(recipe, training={**recipe.training, "learning_rate": 1e-4})


def processes_per_node(gpus: str, machine: hw.Hardware) -> int | None:
    """--gpus auto|N -> processes per node (None: every GPU, or one CPU process)."""
    if gpus == "auto":
        return None
    try:
        count = int(gpus)
    except ValueError:
        raise UserError(f"--gpus {gpus!r} must be 'auto' or a whole number of GPUs.") from None
    if count < 1:
        raise UserError(
            f"--gpus {count}: training needs at least one device. Use --gpus auto to take every "
            "GPU, or --gpus N; on a machine without GPUs, --gpus N runs N CPU worker processes."
        )
    if machine.has_gpus and count > machine.gpus_per_node:
        raise UserError(
            f"--gpus {count}, but this machine has {machine.gpus_per_node} GPU"
            f"{'s' if machine.gpus_per_node != 1 else ''} ({machine.describe()}). Use --gpus auto "
            f"or at most --gpus {machine.gpus_per_node}."
        )
    if not machine.has_gpus and count > machine.cpu_cores:
        raise UserError(
            f"--gpus {count}: this machine has no GPU, so --gpus means CPU worker processes, and "
            f"it has only {machine.cpu_cores} CPU cores. Use at most --gpus {machine.cpu_cores}."
        )
    return count


def _apply_flags(recipe: recipes.Recipe, options: Options) -> recipes.Recipe:
    training = dict(recipe.training)
    if options.max_steps is not None:
        if options.max_steps < 1:
            raise UserError(f"--max-steps {options.max_steps} must be at least 1.")
        training["max_steps"] = options.max_steps
    if options.epochs is not None:
        if options.epochs <= 0:
            raise UserError(f"--epochs {options.epochs} must be positive.")
        training["num_train_epochs"] = options.epochs
        if options.max_steps is None:
            training["max_steps"] = -1  # --epochs alone means: run the epochs
    if options.report_to is not None:
        training["report_to"] = list(options.report_to)
    data = dict(recipe.data)
    for key in ("eval_split", "eval_data", "packing", "system_prompt"):
        if getattr(options, key) is not None:
            data[key] = getattr(options, key)
    if options.eval_data is not None and options.eval_split is None:
        data["eval_split"] = 0  # a separate file replaces the recipe's held-out fraction
    changes = {"training": training, "data": data}
    if options.method != "auto":
        changes["method"] = options.method
    if options.seq_len is not None:
        changes["seq_len"] = options.seq_len
    if options.global_batch_size is not None:
        changes["global_batch_size"] = options.global_batch_size
    out = replace(recipe, **changes)
    for key in ("seq_len", "global_batch_size"):
        if getattr(out, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1.")
    return out


def _check_engine(options: Options, plan: planner.Plan) -> None:
    """--engine names a distributed engine; a plan that cannot use it is a contradiction
    to say out loud, not to ignore, and one that can needs the engine installed."""
    if plan.engine == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise UserError("The plan trains with DeepSpeed (--engine deepspeed), which is not "
                            "installed here. Install it (pip install deepspeed; ftlaunch's "
                            "Makefile shows how without a CUDA toolkit), or use --engine fsdp.")
    if options.engine == "auto" or plan.engine == options.engine or not plan.fits:
        return
    if plan.num_processes == 1:
        raise UserError(f"--engine {options.engine} spreads training over several processes, but "
                        f"this plan runs one (--gpus {options.gpus} on {plan.hardware.describe()}). "
                        f"Leave --engine out for one device, or give --gpus 2 or more.")
    # Without GPUs the plan's engine "cpu" is DDP over gloo: --engine ddp asked for it.
    # (--engine fsdp / deepspeed run as themselves on the CPU processes: planner._candidates.)


def _fit_context(recipe: recipes.Recipe, model: models.ModelSpec,
                 options: Options) -> recipes.Recipe:
    """A sequence longer than the model's context (max_position_embeddings) trains
    positions it never saw: refused when asked for, trimmed when a recipe's default."""
    limit = model.context_length
    if limit is None or recipe.seq_len <= limit:
        return recipe
    if options.seq_len is not None:
        raise UserError(f"--seq-len {options.seq_len} is longer than {model.name}'s context of "
                        f"{limit} tokens (max_position_embeddings in its config). Use "
                        f"--seq-len {limit} or less.")
    return replace(recipe, seq_len=limit)


def _targets(value) -> tuple[str, ...] | str:
    if value == "all-linear":
        return "all-linear"
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).name if "/" in name else name).strip("-")
