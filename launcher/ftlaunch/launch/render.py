"""Plan -> accelerate.yaml (and ds_config.json) in the run directory, from the templates in accelerate_configs/.

The template per engine holds the fixed settings; the plan fills what it
decided (process and machine counts, precision, offload, rendezvous). The files
are a plain accelerate config and a plain DeepSpeed config: users can take them
and run `accelerate launch` by hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ftlaunch.detect.cluster import DEFAULT_PORT
from ftlaunch.errors import UserError
from ftlaunch.plan.memory import ZERO3_LIVE_PARAMETERS
from ftlaunch.plan.planner import Plan
from ftlaunch.resources import accelerate_templates_dir
from ftlaunch.files import atomic_write

DS_CONFIG_FILE = "ds_config.json"
# DeepSpeed's own defaults, written out: a config without "auto" must say them.
_BUCKET = 500_000_000
_PREFETCH_BUCKET = 50_000_000
_PERSISTENCE_THRESHOLD = 100_000  # without a hidden size; with one, 10 x hidden (below)
_LIVE_PARAMETERS = ZERO3_LIVE_PARAMETERS  # the memory model counts what it keeps gathered


@dataclass(frozen=True)
class Rendezvous:
    """Where rank 0 listens; every node of a multi-node job must be given the same."""
    machine_rank: int = 0
    main_process_ip: str = "127.0.0.1"
    main_process_port: int = DEFAULT_PORT


def template_name(plan: Plan) -> str:
    if plan.engine == "cpu":
        return "cpu-ddp" if plan.num_processes > 1 else "cpu"
    if plan.engine in ("single", "ddp", "fsdp"):
        return plan.engine
    if plan.engine == "deepspeed":
        if plan.zero_stage in (2, 3):
            return f"deepspeed-zero{plan.zero_stage}"
        raise UserError(
            f"The plan chose DeepSpeed with ZeRO stage {plan.zero_stage!r}; ftlaunch launches "
            "ZeRO-2 and ZeRO-3 only. Pass --engine fsdp or --engine ddp instead."
        )
    raise UserError(
        f"The plan chose engine {plan.engine!r}, which this version of ftlaunch cannot launch "
        "yet. Pass --engine ddp or fewer GPUs, or use a recipe that fits one replica per GPU."
    )


def accelerate_config(plan: Plan, rendezvous: Rendezvous,
                      ds_config_path: Path | None = None) -> dict:
    path = accelerate_templates_dir() / f"{template_name(plan)}.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    config["num_processes"] = plan.num_processes
    config["num_machines"] = plan.num_machines
    config["machine_rank"] = rendezvous.machine_rank
    if plan.num_processes > 1:
        config["main_process_ip"] = rendezvous.main_process_ip
        config["main_process_port"] = rendezvous.main_process_port
    if plan.engine == "deepspeed":
        # Precision lives in ds_config.json: accelerate refuses a mixed_precision set
        # beside a deepspeed_config_file ("... will be ignored").
        config.pop("mixed_precision", None)
        if ds_config_path is not None:
            config["deepspeed_config"]["deepspeed_config_file"] = str(ds_config_path)
    else:
        config["mixed_precision"] = "no" if plan.precision == "fp32" else plan.precision
    if plan.engine == "fsdp":
        config["fsdp_config"]["fsdp_offload_params"] = bool(plan.offload)
        if plan.on_cpu:
            # N CPU processes: accelerate still starts them through torchrun for the FSDP
            # type, and use_cpu keeps each on the CPU (the worker's ftlaunch.worker.fsdp_cpu makes
            # accelerate go on with FSDP there). DeepSpeed needs no such key: its CPU
            # accelerator (DS_ACCELERATOR=cpu, set by the launcher) does the same.
            config["use_cpu"] = True
            config.pop("gpu_ids", None)
            # FSDP's sync_module_states broadcasts rank 0's weights and refuses CPU
            # tensors, and cpu_ram_efficient_loading (the other ranks load on the meta
            # device) needs that broadcast. Every rank loads the same saved weights instead.
            config["fsdp_config"]["fsdp_sync_module_states"] = False
            config["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] = False
    return config


def deepspeed_config(plan: Plan, training: dict | None = None, node_local: bool = False,
                     hidden_size: int | None = None) -> dict:
    """The ds_config.json of a DeepSpeed plan, every value concrete.

    No "auto": DeepSpeedConfig rejects it outside the HF Trainer, and a file that
    validates standalone is one a user can take elsewhere. The values equal what
    the Trainer derives from its own arguments (it checks they match). No
    optimizer or scheduler section: the Trainer creates both, and a section here
    would replace them.
    """
    if plan.engine != "deepspeed" or plan.zero_stage not in (2, 3):
        raise ValueError(f"not a DeepSpeed ZeRO-2/3 plan: engine {plan.engine!r}, "
                         f"zero_stage {plan.zero_stage!r}")
    training = training or {}
    micro, accumulation = plan.per_device_batch_size, plan.gradient_accumulation_steps
    # Gradient buckets hold the trainable (LoRA) parameters' gradients only: the whole
    # adapter in one bucket, never DeepSpeed's default of 5e8 elements, which ZeRO-3
    # allocates whole per gradient dtype (1-2 GB of GPU memory for an adapter of MBs).
    bucket = max(1, min(_BUCKET, plan.trainable_parameters))
    zero: dict = {
        "stage": plan.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    if plan.zero_stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": _PREFETCH_BUCKET,
            # Parameters below this many elements stay whole on every rank: 10 x hidden
            # (transformers' "auto" for ZeRO-3) keeps norms and biases whole but partitions
            # every weight matrix, which DeepSpeed's fixed 1e5 would leave whole on a
            # small model (all of one with hidden 64).
            "stage3_param_persistence_threshold": (10 * hidden_size if hidden_size
                                                   else _PERSISTENCE_THRESHOLD),
            "stage3_max_live_parameters": _LIVE_PARAMETERS,
            "stage3_max_reuse_distance": _LIVE_PARAMETERS,
            "sub_group_size": _LIVE_PARAMETERS,
            # Gather the partitioned weights into a whole 16-bit state dict on save, so
            # the adapter (and checkpoints) can be written as ordinary files.
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    if plan.offload:
        pin = plan.hardware.has_gpus  # pinned host memory only speeds up copies to a GPU
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
        if plan.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    config: dict = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * plan.num_processes,
        "gradient_clipping": float(training.get("max_grad_norm", 1.0)),
        "bf16": {"enabled": plan.precision == "bf16"},
        "fp16": {"enabled": plan.precision == "fp16"},
        "zero_optimization": zero,
        # The Trainer's AdamW (on the few LoRA parameters) is not one of DeepSpeed's own
        # optimizers: allow it, and with offload let it step on the CPU as it is.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }
    if node_local:
        # Run directories on each node's own disk: every node's first rank writes the
        # model states beside its ranks' optimizer shards, so each node can resume alone.
        config["checkpoint"] = {"use_node_local_storage": True}
    if plan.precision == "fp16":
        # Dynamic loss scaling, DeepSpeed's defaults written out.
        config["fp16"].update({"loss_scale": 0, "initial_scale_power": 16,
                               "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1})
    return config


def write_accelerate_config(plan: Plan, rendezvous: Rendezvous, run_dir: Path,
                            training: dict | None = None, node_local: bool = False,
                            hidden_size: int | None = None) -> Path:
    """Write run_dir/accelerate.yaml, and run_dir/ds_config.json for a DeepSpeed plan.

    `training` is the recipe's training section (gradient clipping for DeepSpeed).
    """
    ds_path = None
    if plan.engine == "deepspeed":
        ds_path = (run_dir / DS_CONFIG_FILE).resolve()
        atomic_write(ds_path, json.dumps(deepspeed_config(plan, training, node_local,
                                                          hidden_size), indent=2) + "\n")
    config = accelerate_config(plan, rendezvous, ds_path)
    target = run_dir / "accelerate.yaml"
    header = (f"# Written by ftlaunch from accelerate_configs/{template_name(plan)}.yaml for "
              f"{plan.engine} / {plan.method}, {plan.num_processes} process(es).\n")
    atomic_write(target, header + yaml.safe_dump(config, sort_keys=False))
    return target
