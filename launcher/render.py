"""Plan -> accelerate.yaml in the run directory, from the templates in accelerate_configs/.

The template per engine holds the fixed settings; the plan fills what it
decided (process and machine counts, precision, rendezvous). The file is a
plain accelerate config: users can take it and run `accelerate launch` by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from ftlaunch.errors import UserError
from ftlaunch.planner import Plan
from ftlaunch.resources import accelerate_templates_dir


@dataclass(frozen=True)
class Rendezvous:
    """Where rank 0 listens; every node of a multi-node job must be given the same."""
    machine_rank: int = 0
    main_process_ip: str = "127.0.0.1"
    main_process_port: int = 29500


def template_name(plan: Plan) -> str:
    if plan.engine == "cpu":
        return "cpu-ddp" if plan.num_processes > 1 else "cpu"
    if plan.engine in ("single", "ddp"):
        return plan.engine
    raise UserError(
        f"The plan chose engine {plan.engine!r}, which this version of ftlaunch cannot launch "
        "yet. Pass --engine ddp or fewer GPUs, or use a recipe that fits one replica per GPU."
    )


def accelerate_config(plan: Plan, rendezvous: Rendezvous) -> dict:
    path = accelerate_templates_dir() / f"{template_name(plan)}.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    config["num_processes"] = plan.num_processes
    config["num_machines"] = plan.num_machines
    config["machine_rank"] = rendezvous.machine_rank
    if plan.num_processes > 1:
        config["main_process_ip"] = rendezvous.main_process_ip
        config["main_process_port"] = rendezvous.main_process_port
    config["mixed_precision"] = "no" if plan.precision == "fp32" else plan.precision
    return config


def write_accelerate_config(plan: Plan, rendezvous: Rendezvous, run_dir: Path) -> Path:
    config = accelerate_config(plan, rendezvous)
    target = run_dir / "accelerate.yaml"
    header = (f"# Written by ftlaunch from accelerate_configs/{template_name(plan)}.yaml for "
              f"{plan.engine} / {plan.method}, {plan.num_processes} process(es).\n")
    _atomic_write(target, header + yaml.safe_dump(config, sort_keys=False))
    return target


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
