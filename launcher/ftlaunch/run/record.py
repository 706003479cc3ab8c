"""The run record: the contract between the launcher and the processes it starts.

The launcher decides everything (model, data, plan, the Trainer's arguments, where
checkpoints live) and writes it once per launch as run.yaml, readable YAML for people.
The workers, export, `ftlaunch resume`, the resume rules, the run directory and a
joining node read it back through `load` only, as these frozen dataclasses: nobody else indexes run.yaml by string keys.
Facts that follow from others (on CPU, processes per node, global batch, checkpoint
format, node-local storage) are fields, computed once by the launcher.

Schema 1 is this layout. Run directories written before it (no `schema` key) still load
for what resume and export need; their derived facts come from the recorded plan
(`_derive_legacy`), and the Trainer's arguments are absent: a worker never sees such a
record, since every launch rewrites run.yaml before it starts one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ftlaunch.errors import UserError
from ftlaunch.models.source import ModelSource
from ftlaunch.run import checkpoints
from ftlaunch.files import atomic_write
from ftlaunch.run.directory import RUN_FILE

SCHEMA = 1
# Where a node's checkpoints live: one directory every node sees, or each node's own disk
# (then every node keeps whole checkpoints: the Trainer's save_on_each_node).
SHARED, NODE_LOCAL = "shared", "node-local"
# The worker module `accelerate launch` (or the launcher itself, for one process) runs,
# and the name it had before version 0.2 (a worker of an older launch may still be writing
# its last checkpoint when the upgraded launcher looks for it).
WORKER_MODULE = "ftlaunch.worker.main"
WORKER_MODULES = (WORKER_MODULE, "ftlaunch.train")


def is_worker_command(args) -> bool:
    """A command line (a list of arguments) that runs ftlaunch's worker module."""
    return any(name in args for name in WORKER_MODULES)


@dataclass(frozen=True)
class Strategy:
    """How the workers train, as the plan decided it."""
    method: str  # lora | qlora
    engine: str  # single | cpu | ddp | fsdp | deepspeed
    zero_stage: int | None  # DeepSpeed's ZeRO stage
    offload: bool  # optimizer state (and ZeRO-3 parameters) offloaded to CPU memory
    precision: str  # bf16 | fp16 | fp32
    on_cpu: bool  # the workers run on CPU processes (gloo)
    nnodes: int
    processes_per_node: int
    world_size: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    global_batch: int
    seq_len: int
    gradient_checkpointing: bool
    checkpoint_format: str  # run.checkpoints.CHECKPOINT_FORMATS: trainer | fsdp | deepspeed
    node_local: bool  # checkpoints on each node's own disk
    objective: str = "sft"  # plan.objectives: sft | dpo | kto (the Trainer and its config)
    # The run starts from the adapter copied into models.adapter.START_FOLDER (--adapter).
    start_adapter: bool = False


@dataclass(frozen=True)
class DataSource:
    """The training data the launcher read and tokenized (the workers load `cache`)."""
    path: str
    format: str
    kind: str  # data.formats.KINDS: conversational | prompt_completion | text | preference ...
    fingerprint: str
    examples: int
    eval: dict | None = field(default=None, hash=False)  # path, fingerprint, examples
    cache: dict | None = field(default=None, hash=False)  # data.cache's record; None: --dry-run


@dataclass(frozen=True)
class Checkpointing:
    keep: int | None  # complete checkpoints kept (None: all)
    save_every_s: float | None  # --save-every, in seconds
    grace_s: float  # how long a stop on a signal may take


@dataclass(frozen=True)
class Distributed:
    timeout_s: int  # a collective's timeout (the Trainer's ddp_timeout)
    env: dict = field(hash=False)  # NCCL/gloo variables the workers get


@dataclass(frozen=True)
class Restarts:
    """In-job restarts (launch.restarts): how many --max-restarts allows this launch, and
    each one done so far: when, which rank failed and its first error line, at which
    step, and the checkpoint every worker started again from. The launcher rewrites
    run.yaml with each one; workers do not use this section."""
    max: int = 0
    done: tuple[dict, ...] = field(default=(), hash=False)


@dataclass(frozen=True)
class RunRecord:
    ftlaunch_version: str
    written: str  # ISO time of this launch
    command: tuple[str, ...]  # the argv that started it (ftlaunch resume re-runs it)
    cwd: str
    identity: dict = field(hash=False)  # what a resume must not change (launch.run_files)
    model: ModelSource
    data: DataSource
    recipe: dict = field(hash=False)  # the resolved recipe, as plan.recipe.Recipe.to_json
    plan: dict = field(hash=False)  # the plan JSON contract, for people and tools
    hardware: dict = field(hash=False)
    versions: dict = field(hash=False)
    plan_hash: str
    checkpointing: Checkpointing
    nodes: dict = field(hash=False)  # nnodes, node_rank, source, storage, master, nodes
    distributed: Distributed
    strategy: Strategy
    # The Trainer's keyword arguments (TRL's SFTConfig) as the launcher resolved them from
    # the recipe, the plan and ftlaunch's defaults; the worker adds only its output_dir.
    # None in a record written before schema 1.
    trainer: dict | None = field(default=None, hash=False)
    restarts: Restarts = Restarts()
    schema: int = SCHEMA

    @property
    def seed(self) -> int:
        """The seed training used (random init, shuffling, the data cache's split)."""
        if self.trainer is not None:
            return int(self.trainer["seed"])
        return int(self.recipe.get("training", {}).get("seed", 42))  # schema 0: 42 was the default

    @property
    def lora(self) -> dict:
        """peft's LoraConfig keyword arguments."""
        return dict(self.recipe.get("lora") or {})

    @property
    def data_options(self) -> dict:
        """The recipe's data section (template, system prompt, packing, loss masking)."""
        return dict(self.recipe.get("data") or {})

    @property
    def training_settings(self) -> dict:
        """The recipe's training section as the user's recipe and --set gave it (what a
        resume compares), before ftlaunch's defaults."""
        return dict(self.recipe.get("training") or {})

    def to_json(self) -> dict:
        """run.yaml's layout: the sections people read first come first."""
        return {
            "schema": self.schema,
            "ftlaunch_version": self.ftlaunch_version,
            "written": self.written,
            "command": list(self.command),
            "cwd": self.cwd,
            "identity": self.identity,
            "model": self.model.to_json(),
            "data": _without_none(dataclasses.asdict(self.data)),
            "recipe": self.recipe,
            "plan": self.plan,
            "hardware": self.hardware,
            "versions": self.versions,
            "plan_hash": self.plan_hash,
            "checkpointing": dataclasses.asdict(self.checkpointing),
            "nodes": self.nodes,
            "distributed": dataclasses.asdict(self.distributed),
            "strategy": dataclasses.asdict(self.strategy),
            "trainer": self.trainer,
            "restarts": {"max": self.restarts.max, "done": list(self.restarts.done)},
        }


def write(run_dir: Path, record: RunRecord) -> Path:
    return atomic_write(Path(run_dir) / RUN_FILE, yaml.safe_dump(record.to_json(), sort_keys=False))


def exists(run_dir: Path) -> bool:
    return (Path(run_dir) / RUN_FILE).is_file()


def load(run_dir: Path) -> RunRecord:
    """run_dir's record; a UserError naming the file when it is missing or damaged."""
    path = Path(run_dir) / RUN_FILE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path} cannot be read ({exc}); the run directory is damaged.") from None
    try:
        return _from_json(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{path} is not a run record ftlaunch can read ({type(exc).__name__}: "
                        f"{exc}); the run directory is damaged or was written by another "
                        "tool.") from None


def _from_json(raw: dict) -> RunRecord:
    schema = int(raw.get("schema", 0))
    if schema > SCHEMA:
        raise ValueError(f"schema {schema} is newer than this ftlaunch's {SCHEMA}: upgrade ftlaunch")
    strategy = (Strategy(**raw["strategy"]) if schema >= 1
                else _derive_legacy(raw["plan"], raw.get("nodes") or {}))
    return RunRecord(
        schema=schema,
        ftlaunch_version=str(raw.get("ftlaunch_version", "")),
        written=str(raw.get("written", "")),
        command=tuple(str(a) for a in raw.get("command") or ()),
        cwd=str(raw.get("cwd") or ""),
        identity=dict(raw.get("identity") or {}),
        model=ModelSource.from_json(raw["model"]),
        data=DataSource(**raw["data"]),
        recipe=dict(raw.get("recipe") or {}),
        plan=dict(raw.get("plan") or {}),
        hardware=dict(raw.get("hardware") or {}),
        versions=dict(raw.get("versions") or {}),
        plan_hash=str(raw.get("plan_hash", "")),
        checkpointing=Checkpointing(**raw["checkpointing"]),
        nodes=dict(raw.get("nodes") or {}),
        distributed=Distributed(**raw["distributed"]),
        strategy=strategy,
        trainer=raw.get("trainer"),
        restarts=Restarts(max=int((raw.get("restarts") or {}).get("max", 0)),
                          done=tuple((raw.get("restarts") or {}).get("done") or ())),
    )


def _derive_legacy(plan: dict, nodes: dict) -> Strategy:
    """A schema-0 record's strategy, from its plan section (what the launcher now records)."""
    machines = int(plan.get("num_machines") or 1)
    return Strategy(
        method=plan["method"], engine=plan["engine"], zero_stage=plan.get("zero_stage"),
        offload=bool(plan.get("offload")), precision=plan["precision"],
        on_cpu=not plan["hardware"]["gpus_per_node"], nnodes=machines,
        processes_per_node=plan["num_processes"] // machines, world_size=plan["num_processes"],
        per_device_batch_size=plan["per_device_batch_size"],
        gradient_accumulation_steps=plan["gradient_accumulation_steps"],
        global_batch=plan["global_batch_size"], seq_len=plan["seq_len"],
        gradient_checkpointing=plan["gradient_checkpointing"],
        checkpoint_format=checkpoints.format_of(plan["engine"]),
        node_local=nodes.get("storage") == NODE_LOCAL)


def _without_none(data: dict) -> dict:
    return {k: v for k, v in data.items() if v is not None}
