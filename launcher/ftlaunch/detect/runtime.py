"""The software this machine runs: the versions run.yaml records and `ftlaunch doctor`
shows (python, ftlaunch, torch with its CUDA, NCCL and cuDNN, the GPU driver, the
libraries), and which `--report-to` trackers are installed.

No torch at import time: `torch_runtime` (and `runtime_versions`) import it when called.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata

from ftlaunch import __version__
from ftlaunch.detect.hardware import nvidia_smi
from ftlaunch.errors import UserError

# torch is reported by the imported build itself (torch_runtime), not its dist-info.
PACKAGES = ("transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes",
            "deepspeed", "click", "psutil")


def runtime_versions() -> dict:
    """What the run ran on, for run.yaml: python, ftlaunch, torch and the CUDA it was built
    with, NCCL and cuDNN (None without CUDA), the GPU driver (None without nvidia-smi),
    the libraries, the interpreter."""
    out: dict = {"python": platform.python_version(), "ftlaunch": __version__}
    out.update(package_versions(PACKAGES))
    out.update(torch_runtime())
    out["gpu_driver"] = gpu_driver()
    out["executable"] = sys.executable
    return out


def package_versions(names) -> dict[str, str | None]:
    """{name: installed version, None where not installed}, from the distributions'
    metadata (importlib.metadata normalises the names: flash_attn finds flash-attn)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def torch_runtime() -> dict:
    # The imported build is what the workers run, which a stale dist-info could contradict:
    # its version.py, the file torch itself reads them from. A CPU build has no NCCL or
    # cuDNN, so the launcher need not import torch for it (~2 s, on every launch).
    build = _torch_build()
    out = {"torch": build["__version__"], "torch_cuda": build["cuda"], "nccl": None,
           "cudnn": None}
    if build["cuda"] is None and build["hip"] is None:
        return out
    import torch

    if torch.cuda.is_available():
        try:
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError):
            pass  # a CUDA build without NCCL (Windows)
    if torch.backends.cudnn.is_available():
        out["cudnn"] = torch.backends.cudnn.version()
    return out


def _torch_build() -> dict:
    """torch/version.py of the torch `import torch` would load, run on its own (it imports
    only typing): __version__, cuda, hip."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("torch is not installed in this Python environment "
                        f"({sys.executable}); install the project (make test does).")
    path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    namespace: dict = {}
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)
    return {key: namespace.get(key) for key in ("__version__", "cuda", "hip")}


def gpu_driver() -> str | None:
    """The NVIDIA driver's version (nvidia-smi's), None without nvidia-smi."""
    lines = nvidia_smi("driver_version")
    return lines[0].strip() if lines else None


# `--report-to` trackers: transformers' integrations (INTEGRATION_TO_CALLBACK, which a
# test compares with these names), the package to install for each, and the modules
# transformers looks for ("a|b": either will do).
REPORTERS = {
    "azure_ml": ("azureml-core", ("azureml.core.run",)),
    "clearml": ("clearml", ("clearml",)),
    "codecarbon": ("codecarbon", ("codecarbon",)),
    "comet_ml": ("comet_ml", ("comet_ml",)),
    "dagshub": ("dagshub", ("dagshub", "mlflow")),
    "dvclive": ("dvclive", ("dvclive",)),
    "flyte": ("flytekitplugins-deck-standard", ("flytekit", "flytekitplugins.deck")),
    "kubeflow": ("kubeflow-trainer", ()),  # transformers asks the environment, not a module
    "mlflow": ("mlflow", ("mlflow",)),
    "neptune": ("neptune", ("neptune",)),
    "swanlab": ("swanlab", ("swanlab",)),
    "tensorboard": ("tensorboard", ("tensorboard|tensorboardX",)),
    "trackio": ("trackio", ("trackio",)),
    "wandb": ("wandb", ("wandb",)),
}


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent is missing
        return False


def check_reporters(report_to) -> None:
    """The trackers asked for exist and are installed: the Trainer would otherwise fail
    on every rank after the model is loaded."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if len(names) > 1 and {"none", "all"} & set(names):
        raise UserError(f"--report-to {','.join(names)}: 'none' and 'all' stand alone; name "
                        "trackers, or one of those two.")
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in REPORTERS:
            raise UserError(f"--report-to {name}: not a tracker transformers knows; use one of "
                            f"{', '.join(REPORTERS)} (or none).")
        package, modules = REPORTERS[name]
        if not all(any(_importable(m) for m in alternatives.split("|"))
                   for alternatives in modules):
            raise UserError(f"--report-to {name}: the {package} package is not installed "
                            f"here. pip install {package}, or leave --report-to out "
                            "(metrics.jsonl and loss.png are always written).")
