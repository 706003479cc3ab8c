"""What the job runs on: detected from this machine or described by a spec string.

Detection reads `nvidia-smi` rather than torch.cuda so that `ftlaunch plan`
and `ftlaunch hardware` stay torch-free and start in well under a second.
A described Hardware (`8xH100-80GB`, `2x8xA100-80GB`, `cpu`) is the same
value, so every plan can be made and tested on a machine without those GPUs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil

from ftlaunch.errors import UserError
from ftlaunch.units import GIB, MIB

# Compute capability of GPUs that specs name; bf16 needs sm_80 (Ampere) or newer.
_KNOWN_GPUS: dict[str, tuple[int, int]] = {
    "H200": (9, 0),
    "H100": (9, 0),
    "GH200": (9, 0),
    "B200": (10, 0),
    "A100": (8, 0),
    "A800": (8, 0),
    "A10G": (8, 6),
    "A10": (8, 6),
    "A6000": (8, 6),
    "RTXA6000": (8, 6),
    "L40S": (8, 9),
    "L40": (8, 9),
    "L4": (8, 9),
    "RTX4090": (8, 9),
    "RTX3090": (8, 6),
    "RTX6000ADA": (8, 9),
    "V100": (7, 0),
    "T4": (7, 5),
}


def known_gpu(name: str) -> str | None:
    """The _KNOWN_GPUS key a GPU name stands for: a spec's NAME ("H100", "RTX4090") or a
    driver's ("NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 4090", "NVIDIA RTX A6000").
    Whole words only, joined with their neighbours: an "RTX A1000" is not an A100."""
    words = [w for w in re.split(r"[\s_-]+", name.upper()) if w]
    for size in (3, 2, 1):  # the longest spelling first: RTX6000ADA before RTX6000
        for i in range(len(words) - size + 1):
            joined = "".join(words[i:i + size])
            if joined in _KNOWN_GPUS:
                return joined
    return None


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    compute_capability: tuple[int, int] | None

    @property
    def bf16(self) -> bool:
        # Unknown GPUs described by hand are assumed modern; detected ones always know.
        return self.compute_capability is None or self.compute_capability >= (8, 0)


@dataclass(frozen=True)
class Hardware:
    nodes: int
    gpus_per_node: int
    gpu: Gpu | None
    cpu_cores: int
    ram_bytes: int
    disk_free_bytes: int | None = None
    source: str = "detected"  # "detected" or the spec string it was described by

    @property
    def has_gpus(self) -> bool:
        return self.gpu is not None and self.gpus_per_node > 0

    def describe(self) -> str:
        if not self.has_gpus:
            return f"CPU only: {self.cpu_cores} cores, {self.ram_bytes / GIB:.0f} GiB RAM"
        per_node = f"{self.gpus_per_node}x {self.gpu.name} ({self.gpu.memory_bytes / GIB:.0f} GiB)"
        return per_node if self.nodes == 1 else f"{self.nodes} nodes x {per_node}"

    def to_json(self) -> dict:
        data = asdict(self)
        data["gpu_name"] = self.gpu.name if self.gpu else None
        data["gpu_memory_bytes"] = self.gpu.memory_bytes if self.gpu else 0
        data["bf16"] = self.gpu.bf16 if self.gpu else False
        return data


_SPEC = re.compile(
    r"^(?:(?P<nodes>\d+)x)?(?P<gpus>\d+)x(?P<name>[A-Za-z0-9]+?)-(?P<mem>\d+(?:\.\d+)?)GB$",
    re.IGNORECASE,
)


def parse_spec(spec: str) -> Hardware:
    """`cpu`, `8xH100-80GB`, `2x8xA100-80GB` (nodes x gpus per node) -> Hardware.

    Memory in a spec is the marketed size in GB as vendors print it (80GB A100 has
    80 GiB usable to within a few hundred MiB), taken as GiB.
    """
    text = spec.strip()
    cpu_cores, ram = _local_cpu_and_ram()
    if text.lower() == "cpu":
        return Hardware(nodes=1, gpus_per_node=0, gpu=None, cpu_cores=cpu_cores,
                        ram_bytes=ram, source=text)
    match = _SPEC.match(text.replace(" ", ""))
    if not match and re.fullmatch(r"(\d+x){1,2}[A-Za-z][A-Za-z0-9]*", text.replace(" ", "")):
        raise UserError(f"--hardware {spec!r} names no GPU memory: add it as -NNGB, e.g. "
                        f"{text.replace(' ', '')}-80GB (memory decides every plan).")
    if not match:
        raise UserError(
            f"--hardware {spec!r} is not a hardware spec. Write GPUS x NAME-MEMORY, optionally "
            "prefixed by NODES x: for example 1xRTX4090-24GB, 8xH100-80GB, 2x8xA100-80GB, or "
            "'cpu' for a machine without GPUs."
        )
    nodes = int(match["nodes"] or 1)
    gpus = int(match["gpus"])
    if nodes < 1 or gpus < 1:
        raise UserError(f"--hardware {spec!r}: node and GPU counts must be at least 1.")
    name = match["name"].upper()
    gpu = Gpu(name=name, memory_bytes=int(float(match["mem"]) * GIB),
              compute_capability=_KNOWN_GPUS.get(name))
    return Hardware(nodes=nodes, gpus_per_node=gpus, gpu=gpu, cpu_cores=cpu_cores,
                    ram_bytes=ram, source=text)


def detect(output_dir: Path | None = None) -> Hardware:
    """This machine as it is: visible CUDA GPUs, CPU cores, RAM, free disk."""
    cpu_cores, ram = _local_cpu_and_ram()
    gpus = _nvidia_smi_gpus()
    disk = _free_disk(output_dir) if output_dir is not None else None
    if not gpus:
        return Hardware(nodes=1, gpus_per_node=0, gpu=None, cpu_cores=cpu_cores,
                        ram_bytes=ram, disk_free_bytes=disk)
    # Plans assume one GPU model per node; a mixed box is planned for its smallest card.
    smallest = min(gpus, key=lambda g: g.memory_bytes)
    return Hardware(nodes=1, gpus_per_node=len(gpus), gpu=smallest, cpu_cores=cpu_cores,
                    ram_bytes=ram, disk_free_bytes=disk)


def with_nodes(hardware: Hardware, nodes: int) -> Hardware:
    return replace(hardware, nodes=nodes)


def _local_cpu_and_ram() -> tuple[int, int]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return int(cores or 1), int(psutil.virtual_memory().total)


def free_disk(path: Path) -> tuple[Path, int]:
    """(the nearest existing ancestor of path, bytes still free on its filesystem): the
    run directory may not exist yet."""
    probe = Path(path).expanduser().resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe, shutil.disk_usage(probe).free


def _free_disk(path: Path) -> int | None:
    try:
        return free_disk(path)[1]
    except OSError:
        return None


def nvidia_smi(fields: str) -> list[str] | None:
    """One line per GPU of `nvidia-smi --query-gpu=FIELDS` (csv, no header, no units), or
    None where there is no nvidia-smi or it fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()


def _nvidia_smi_gpus() -> list[Gpu]:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return []
    gpus = {}
    for line in nvidia_smi("index,name,memory.total,compute_cap") or []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        index, name, mem_mib, cap = parts
        major, _, minor = cap.partition(".")
        gpus[index] = Gpu(name=name, memory_bytes=int(float(mem_mib)) * MIB,
                          compute_capability=(int(major), int(minor or 0)))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [gpus[i] for i in (v.strip() for v in visible.split(",")) if i in gpus]
    return list(gpus.values())
