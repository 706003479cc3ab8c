"""Training recipes (recipes/*.yaml) and `--set KEY=VALUE` overrides.

A recipe has four parts: top-level plan inputs (objective, method, seq_len,
global_batch_size), `training` (the objective's TRL config: SFTConfig, DPOConfig or KTOConfig /
TrainingArguments fields, spelled as they are), `lora` (peft LoraConfig fields) and `data` (ftlaunch's
own data options). Keys and value types are checked against the real
dataclasses before anything starts, so a typo fails in a second, not after
model loading on eight GPUs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from ftlaunch.plan import config_fields
from ftlaunch.plan import objectives
from ftlaunch.data.formats import DATA_FORMAT_CHOICES
from ftlaunch.errors import UserError
from ftlaunch.resources import recipes_dir

DEFAULT_RECIPE = "default"
TOP_LEVEL_KEYS = ("description", "objective", "method", "seq_len", "global_batch_size",
                  "training", "lora", "data")
DATA_KEYS: dict[str, type | tuple] = {
    "format": str,
    "system_prompt": (str, type(None)),
    "packing": bool,  # best-fit packing, padding-free (on by default)
    "assistant_only_loss": bool,  # conversational data: loss on assistant turns only
    "eval_split": (int, float),  # fraction held out for evaluation
    "eval_data": (str, type(None)),  # a separate evaluation file
}
METHODS = ("auto", "lora", "qlora")

# SFTConfig fields the plan or a flag decides; setting them by hand would
# contradict the plan, so --set names the flag to use instead.
PLAN_OWNED = {
    "output_dir": "--output-dir",
    "max_length": "--seq-len",
    "per_device_train_batch_size": "--global-batch-size (the plan splits it)",
    "gradient_accumulation_steps": "--global-batch-size (the plan splits it)",
    "use_cpu": "the detected hardware",
    "bf16": "the detected hardware",
    "fp16": "the detected hardware",
    "gradient_checkpointing": "--gradient-checkpointing / --no-gradient-checkpointing",
    "activation_checkpointing": "--gradient-checkpointing / --no-gradient-checkpointing",
    "resume_from_checkpoint": "re-running the same command (it resumes by itself)",
    "save_on_each_node": "where --output-dir is (node-local run directories are detected)",
    # The launcher tokenizes the data once (ftlaunch.data.cache); these would change how.
    "eos_token": "the model's tokenizer (the data is tokenized before training)",
    "chat_template_path": "the model's tokenizer (the data is tokenized before training)",
    "dataset_text_field": "--data formats (the data is tokenized before training)",
    "assistant_only_loss": "data.assistant_only_loss (the data is tokenized before training)",
    "completion_only_loss": "the data's format (prompt/completion data trains on completions)",
    "packing": "--packing / --no-packing (data.packing)",
    "ddp_backend": "the engine (nccl on GPUs, gloo on CPU)",
    # DPO: the launcher's length notes count pairs cut at the end, the prompt kept whole.
    "truncation_mode": "--seq-len (DPO keeps the prompt and cuts the answers, keep_start)",
}

def eval_defaults(training: dict) -> dict:
    """With an evaluation set: evaluate at the checkpoints' steps, unless told otherwise."""
    return {"eval_strategy": "steps", "eval_steps": training.get("save_steps", 50)}


# The numeric settings people change most, with the values that can train: checked here
# in microseconds, because TRL and peft accept most of these out of range (lora.r=0, a
# negative or NaN learning rate, dropout 1.5) and the worker would fail after loading the
# model. Any other key given with --set or by a recipe file also goes through the
# libraries' own constructors (_check_with_libraries: a ~6 s import, only then).
_POSITIVE = (lambda v: v > 0, "a number greater than 0")
_NON_NEGATIVE = (lambda v: v >= 0, "a number of 0 or more")
_FRACTION = (lambda v: 0 <= v < 1, "a number from 0 up to (not including) 1")
_COUNT = (lambda v: v >= 1, "a whole number of at least 1")
RANGES = {
    "training": {
        "learning_rate": _POSITIVE,
        "weight_decay": _NON_NEGATIVE,
        "max_grad_norm": _NON_NEGATIVE,  # 0 turns clipping off
        "warmup_steps": _NON_NEGATIVE,  # below 1: a ratio of the total steps
        "warmup_ratio": (lambda v: 0 <= v <= 1, "a number from 0 to 1"),
        "adam_beta1": _FRACTION,
        "adam_beta2": _FRACTION,
        "adam_epsilon": _POSITIVE,
        "label_smoothing_factor": _FRACTION,
        "num_train_epochs": _POSITIVE,
        "max_steps": (lambda v: v == -1 or v >= 1, "-1 (run the epochs) or at least 1"),
        "logging_steps": _POSITIVE,
        "save_steps": _POSITIVE,
        "eval_steps": _POSITIVE,
        "save_total_limit": _COUNT,
        "seed": _NON_NEGATIVE,
        "ddp_timeout": _POSITIVE,
    },
    "lora": {
        "r": _COUNT,
        "lora_alpha": _POSITIVE,
        "lora_dropout": _FRACTION,
    },
}
# Keys whose type check (and, for report_to, detect.runtime.check_reporters) says all there is.
_CHECKED_HERE = {"training": {"report_to", *RANGES["training"]},
                 "lora": {"target_modules", "bias", *RANGES["lora"]}}

# Credentials are read from the environment by the libraries that need them: a value
# given here would be written into run.yaml, the checkpoints' training_args.bin and the
# shell history. Field -> the variable to set instead.
SECRET_KEYS = {"hub_token": "HF_TOKEN"}


def _refuse_secret(key: str, where: str) -> None:
    if key in SECRET_KEYS:
        raise UserError(f"{where}{key}: ftlaunch does not take credentials as settings (they would "
                        f"be written into run.yaml and every checkpoint). Put the token in the "
                        f"environment instead ({SECRET_KEYS[key]}=...), where the libraries read it.")


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    method: str
    seq_len: int
    global_batch_size: int
    training: dict = field(default_factory=dict, hash=False)
    lora: dict = field(default_factory=dict, hash=False)
    data: dict = field(default_factory=dict, hash=False)
    objective: str = "sft"  # plan.objectives: what the training section configures

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# What a recipe that leaves these out trains with (every bundled recipe states them): one
# place for the planner's defaults (planner.TrainSpec) and the recipes'.
DEFAULT_SEQ_LEN = 1024
DEFAULT_GLOBAL_BATCH = 16
LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                 "target_modules": "all-linear", "bias": "none"}

# The seed when a recipe names none (TRL's default too): training, random init, and the
# data cache's held-out split all take the run's seed from `seed`.
DEFAULT_SEED = 42


def seed(training: dict) -> int:
    return int(training.get("seed", DEFAULT_SEED))


def packing(data: dict) -> bool:
    """Whether a recipe's data section packs examples (on unless it says otherwise)."""
    return bool(data.get("packing", True))


def recipe_paths() -> dict[str, Path]:
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml")) if p.stem != "models"}


def load_recipe(name_or_path: str) -> Recipe:
    path = Path(name_or_path).expanduser()
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        paths = recipe_paths()
        if name_or_path not in paths:
            raise UserError(
                f"--recipe {name_or_path!r} is neither a bundled recipe ({', '.join(paths)}) "
                "nor a .yaml file that exists."
            )
        path = paths[name_or_path]
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"Recipe {path} cannot be read as YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"Recipe {path} must be a YAML mapping with keys {', '.join(TOP_LEVEL_KEYS)}.")
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise UserError(f"Recipe {path} has unknown keys {unknown}; allowed: {', '.join(TOP_LEVEL_KEYS)}.")
    for section in ("training", "lora", "data"):
        if not isinstance(raw.get(section) or {}, dict):
            raise UserError(f"Recipe {path}: `{section}` must be a mapping.")
    recipe = Recipe(
        name=path.stem,
        description=str(raw.get("description", "")),
        method=str(raw.get("method", "auto")),
        objective=str(raw.get("objective", "sft")),
        seq_len=raw.get("seq_len", DEFAULT_SEQ_LEN),
        global_batch_size=raw.get("global_batch_size", DEFAULT_GLOBAL_BATCH),
        training=dict(raw.get("training") or {}),
        # peft's own defaults (r 8, its per-model targets) are not what the plan counts.
        lora={**LORA_DEFAULTS, **(raw.get("lora") or {})},
        data=_recipe_relative(dict(raw.get("data") or {}), path),
    )
    _check_top_level(recipe, f"Recipe {path}")
    return recipe


def _recipe_relative(data: dict, path: Path) -> dict:
    """A file a recipe names (data.eval_data) is found beside the recipe, wherever the
    command runs from: a recipe checked in with its data means the same from any folder.
    `~` is expanded; nothing else is interpreted (no variables, no globbing)."""
    value = data.get("eval_data")
    if isinstance(value, str) and value:
        target = Path(value).expanduser()
        data["eval_data"] = str(target if target.is_absolute() else (path.parent / target).resolve())
    return data


def _check_top_level(recipe: Recipe, where: str) -> None:
    if recipe.objective not in objectives.OBJECTIVES:
        raise UserError(f"{where}: objective must be one of {', '.join(objectives.OBJECTIVES)}, "
                        f"not {recipe.objective!r}.")
    if recipe.method not in METHODS:
        raise UserError(f"{where}: method must be one of {', '.join(METHODS)}, not {recipe.method!r}.")
    for key in ("seq_len", "global_batch_size"):
        value = getattr(recipe, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{where}: {key} must be a positive integer, not {value!r}.")


def apply_overrides(recipe: Recipe, assignments: tuple[str, ...] | list[str]) -> Recipe:
    """`--set k=v`: training keys bare, `lora.k`, `data.k`. Values are YAML scalars."""
    training, lora, data = dict(recipe.training), dict(recipe.lora), dict(recipe.data)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {assignment!r} must look like KEY=VALUE, e.g. --set learning_rate=1e-4.")
        value = _parse_scalar(text)
        section, _, sub = key.partition(".")
        if sub and section == "lora":
            lora[sub] = value
        elif sub and section == "data":
            data[sub] = value
        elif sub:
            raise UserError(f"--set {key}: only lora.* and data.* keys are nested; training keys "
                            "are bare SFTConfig field names such as learning_rate.")
        elif key in PLAN_OWNED:
            raise UserError(f"--set {key} is decided by {PLAN_OWNED[key]}; use that instead.")
        else:
            training[key] = value
    return replace(recipe, training=training, lora=lora, data=data)


def _parse_scalar(text: str):
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def validate(recipe: Recipe, set_keys: frozenset[str] = frozenset(), source: str = "") -> Recipe:
    """Check every key and type against SFTConfig, LoraConfig and DATA_KEYS.

    Returns the recipe with values coerced to the declared types (YAML reads
    1e-4 as a string; SFTConfig wants a float). A refusal names where the key came
    from: `set_keys` were given with --set, the others are the recipe file `source`'s.
    """
    def where(key: str, section: str) -> str:
        return "--set " if key in set_keys else f"Recipe {source or recipe.name}: {section}."

    for key in recipe.training:  # before the field check: hub_token is a field
        _refuse_secret(key, where(key, "training"))
    objective = objectives.get(recipe.objective)
    training = _coerce_section(recipe.training, objective.fields, "", where)
    for key in training:
        if key in PLAN_OWNED:
            raise UserError(f"Recipe {recipe.name}: training.{key} is decided by {PLAN_OWNED[key]}.")
        if key in objective.refused and training[key] != objective.refused[key][0]:
            raise UserError(f"{where(key, 'training')}{key}: ftlaunch does not train "
                            f"{objective.name.upper()} that way: {objective.refused[key][1]}.")
    lora = _coerce_section(recipe.lora, "lora", "lora.", where)
    # Bundled recipes are checked by the test suite; what --set or a recipe file adds
    # beyond the ranges goes to the libraries themselves.
    custom = (source or recipe.name) not in recipe_paths()
    unchecked = {name: [k for k in values if k not in _CHECKED_HERE[name]
                        and (custom or (prefix + k) in set_keys)]
                 for name, values, prefix in (("training", training, ""), ("lora", lora, "lora."))}
    if unchecked["training"] or unchecked["lora"]:
        shown = ", ".join([*(f"{k}={training[k]!r}" for k in unchecked["training"]),
                           *(f"lora.{k}={lora[k]!r}" for k in unchecked["lora"])])
        evaluates = bool(recipe.data.get("eval_split") or recipe.data.get("eval_data"))
        _check_with_libraries(objective, training if unchecked["training"] else {},
                              lora if unchecked["lora"] else {}, evaluates,
                              f"{'--set ' if not custom else f'Recipe {source}: '}{shown}")
    data = {}
    for key, value in recipe.data.items():
        if key not in DATA_KEYS:
            raise UserError(f"data.{key} is not a data option; known: {', '.join(DATA_KEYS)}.")
        if not isinstance(value, DATA_KEYS[key]):
            raise UserError(f"data.{key}={value!r} has the wrong type.")
        data[key] = value
    if data.get("format", "auto") not in DATA_FORMAT_CHOICES:
        raise UserError(f"data.format must be one of {', '.join(DATA_FORMAT_CHOICES)}, "
                        f"not {data['format']!r}.")
    return replace(recipe, training=training, lora=lora, data=data)


def _coerce_section(values: dict, section: str, prefix: str, where) -> dict:
    import difflib

    types_by_name = config_fields.fields(section)
    owners = {"lora": "peft's LoraConfig",
              **{o.fields: f"TRL's {o.config} / TrainingArguments"
                 for o in objectives.OBJECTIVES.values()}}
    out = {}
    for key, value in values.items():
        origin = where(prefix + key, section)
        shown = f"{origin}{prefix}{key}" if origin.startswith("--set") else f"{origin}{key}"
        if key not in types_by_name:
            close = difflib.get_close_matches(key, list(types_by_name), n=3, cutoff=0.75)
            close += sorted(n for n in types_by_name if n not in close
                            and (key.lower() in n.lower() or n.lower() in key.lower()))
            hint = f" Did you mean {', '.join(close[:4])}?" if close else ""
            owner = owners[section]
            raise UserError(f"{shown}: {owner} has no field {key!r}.{hint} `ftlaunch train "
                            f"--help` and the {owner.split()[1]} documentation list the fields.")
        try:
            out[key] = config_fields.coerce(value, types_by_name[key])
        except (TypeError, ValueError):
            raise UserError(f"{shown}={value!r}: expected "
                            f"{config_fields.type_name(types_by_name[key])}.") from None
        _check_range("lora" if section == "lora" else "training", key, out[key],
                     f"{shown}={value}")
    return out


def _check_range(section: str, key: str, value, shown: str) -> None:
    if value is None or isinstance(value, (bool, str, list, dict)):
        return  # None where the field allows it; a type of its own was checked above
    allowed = RANGES[section].get(key)
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{shown}: not a finite number; {key} must be "
                        f"{allowed[1] if allowed else 'a finite number'}.")
    if allowed and not allowed[0](value):
        raise UserError(f"{shown}: out of range; {key} must be {allowed[1]}.")


def _check_with_libraries(objective: objectives.Objective, training: dict, lora: dict,
                          evaluates: bool, shown: str) -> None:
    """The TRL config's and LoraConfig's own validation (scheduler names, strategies, option
    combinations), for settings the ranges above do not cover. Nothing is written: the
    output_dir given is only a name."""
    import tempfile
    import warnings

    from ftlaunch.quiet import silence_library_noise

    silence_library_noise()
    checks = []
    if training:
        import trl

        config = getattr(trl, objective.config)
        settings = {**objective.trainer_defaults, **(eval_defaults(training) if evaluates else {}),
                    **training, "report_to": "none"}  # trackers: runtime.check_reporters
        checks.append((f"TRL's {objective.config}", lambda: config(
            output_dir=str(Path(tempfile.gettempdir()) / "ftlaunch-validate"), use_cpu=True,
            **settings)))
    if lora:
        from peft import LoraConfig

        checks.append(("peft's LoraConfig", lambda: LoraConfig(task_type="CAUSAL_LM", **lora)))
    for owner, construct in checks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                construct()
            except (TypeError, ValueError) as exc:
                message = " ".join(str(exc).split()).rstrip(".")
                raise UserError(f"{shown}: {owner} refuses these settings: {message}.") from None
