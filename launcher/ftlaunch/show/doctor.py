"""`ftlaunch doctor`: what this machine lacks for fine-tuning, said before a run finds out.

A run fails late and far from the cause: a missing trl is an ImportError in every
worker, a CPU-only torch build a plan a hundred times slower than expected, a read-only
output folder an error after the data is tokenized. Each check here is the cheap, real
probe of what a run would hit, with the fix beside it. "missing" is kept for what stops
every run (exit code 1); what only some methods or engines need (a GPU, bitsandbytes,
deepspeed, flash-attn) is a warning, since ftlaunch still trains without it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import sys
import textwrap
import warnings
from collections import Counter
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path

import psutil
from huggingface_hub import constants as hub_constants
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import Specifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from ftlaunch.launch import preflight
from ftlaunch.run import directory as rundir
from ftlaunch.errors import UserError
from ftlaunch.detect.hardware import GIB, free_disk, nvidia_smi
from ftlaunch.resources import constraints_path

STATUSES = ("ok", "warn", "missing")
CORE_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")
# Below this a 7-8B run's checkpoints and data cache may not fit; each run still checks
# what it needs itself (preflight.check_disk), so this is only a warning.
DISK_WARN_BYTES = 20 * GIB
# Twice what one GPU worker holds in libraries before any model (about 2 GiB, preflight's
# figure): below it even a small model is tight. Each run checks the RAM it needs itself
# (preflight.check_ram), so this is only a warning.
RAM_WARN_BYTES = 4 * GIB
_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

_WIDTH = 100
_NAME_WIDTH = 14
_DETAIL_INDENT = " " * (2 + 8 + 1 + _NAME_WIDTH + 1)
_FIX_PREFIX = " " * 11 + "-> fix: "


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | missing
    detail: str  # what was found
    fix: str = ""  # "" when ok, else one sentence saying what to do

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"check {self.name}: status {self.status!r} is not one of {STATUSES}")
        if (self.status == "ok") == bool(self.fix):
            raise ValueError(f"check {self.name}: a fix is given exactly when status is not ok")


def run_checks(output_dir: Path) -> list[Check]:
    """Every check: python, the core packages, cuda, bf16, bitsandbytes, deepspeed, nccl,
    flash-attn, disk, ram, hf-hub. Imports torch (and bitsandbytes where installed):
    a few seconds on CPU."""
    pins = _pins()
    requires_python, needs = _declared()
    versions = preflight.package_versions((*CORE_PACKAGES, "bitsandbytes", "deepspeed",
                                           "flash-attn"))
    torch, torch_error, runtime, said = _import_torch()
    if torch is not None:
        versions["torch"] = runtime["torch"]  # the build that imports, as run.yaml records it
    checks = [_python(requires_python)]
    checks += [_package(name, versions[name], pins, needs,
                        torch_error if name == "torch" else None) for name in CORE_PACKAGES]
    cuda = _cuda(torch, runtime, said)
    on_gpu = cuda.status == "ok"
    checks += [cuda, _bf16(torch, on_gpu),
               _bitsandbytes(torch, on_gpu, versions["bitsandbytes"], pins, needs),
               _deepspeed(versions["deepspeed"], pins, needs), _nccl(torch, runtime, on_gpu),
               _flash_attn(torch, on_gpu, versions["flash-attn"]), _disk(Path(output_dir)),
               _ram(), _hf_hub()]
    return checks


def exit_code(checks: list[Check]) -> int:
    """0 when ftlaunch can train here (perhaps only on CPU), 1 when something essential is
    missing."""
    return 1 if any(c.status == "missing" for c in checks) else 0


def render(checks: list[Check]) -> str:
    lines = ["ftlaunch doctor"]
    for c in checks:
        head = f"  {c.status:<8} {c.name:<{_NAME_WIDTH}} "
        lines += _wrap(c.detail, head, _DETAIL_INDENT)
        if c.fix:
            lines += _wrap(c.fix, _FIX_PREFIX, " " * len(_FIX_PREFIX))
    lines.append(verdict(checks))
    return "\n".join(lines) + "\n"


def verdict(checks: list[Check]) -> str:
    missing = [c.name for c in checks if c.status == "missing"]
    if missing:
        packages = [n for n in missing if n in CORE_PACKAGES]
        others = [n for n in missing if n not in CORE_PACKAGES]
        parts = []
        if packages:
            parts.append(f"{_count(len(packages), 'essential package')} missing "
                         f"({', '.join(packages)})")
        if others:
            parts.append(f"{_count(len(others), 'essential check')} failed ({', '.join(others)})")
        return f"Not ready: {'; '.join(parts)}."
    warned = sum(c.status == "warn" for c in checks)
    on_gpu = any(c.name == "cuda" and c.status == "ok" for c in checks)
    where = "on GPU" if on_gpu else "on CPU"
    return f"Ready to train {where}" + (f" ({_count(warned, 'warning')})." if warned else ".")


# --- packages ----------------------------------------------------------------------------

def _pins() -> dict[str, str]:
    """{canonical name: version} of constraints.txt's name==version lines."""
    path = constraints_path()
    if path is None:
        return {}
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        try:
            requirement = Requirement(line)
        except InvalidRequirement:  # blank, or a pip option (-c, --index-url ...)
            continue
        specs = list(requirement.specifier)
        if len(specs) == 1 and specs[0].operator == "==":
            pins[canonicalize_name(requirement.name)] = specs[0].version
    return pins


def _declared() -> tuple[str, dict[str, str]]:
    """(ftlaunch's Requires-Python, {canonical name: version range} of its requirements,
    extras included) as its metadata declares them; nothing where it is not installed."""
    try:
        declared = metadata.metadata("ftlaunch")
    except metadata.PackageNotFoundError:
        return "", {}
    out: dict[str, str] = {}
    for line in declared.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        # Lower bounds first: ">=5.0,<6" reads better than packaging's "<6,>=5.0".
        specs = sorted((str(s) for s in requirement.specifier),
                       key=lambda s: not s.startswith(">"))
        out.setdefault(canonicalize_name(requirement.name), ",".join(specs))
    return declared.get("Requires-Python") or "", out


def _install(name: str, pins: dict[str, str], needs: dict[str, str]) -> str:
    pin = pins.get(canonicalize_name(name))
    spec = f"=={pin}" if pin else needs.get(canonicalize_name(name), "")
    return f"pip install '{name}{spec}'" if spec else f"pip install {name}"


def _versioned(name: str, version: str, pins: dict[str, str], needs: dict[str, str],
               status_if_outside: str, use: str = "") -> Check:
    """The check of an installed package: against ftlaunch's declared range (outside it:
    status_if_outside), then constraints.txt's pin (another version: warn). A version
    that is not PEP 440 cannot be placed in a range and matches no pin."""
    try:
        parsed = Version(version)
    except InvalidVersion:
        parsed = None
    spec = needs.get(canonicalize_name(name), "")
    if parsed is not None and not SpecifierSet(spec).contains(parsed, prereleases=True):
        return Check(name, status_if_outside, f"{version} installed; ftlaunch needs {name}{spec}",
                     f"{_install(name, pins, needs)}.")
    pin = pins.get(canonicalize_name(name))
    use = f"; {use}" if use else ""
    if pin is None:
        return Check(name, "ok", f"{version}{use}")
    # As pip -c would judge it: a pin without a local label admits any build (+cpu, +cu128).
    if parsed is not None and Specifier(f"=={pin}").contains(parsed, prereleases=True):
        return Check(name, "ok", f"{version} (pinned {pin}){use}")
    return Check(name, "warn", f"{version}, but constraints.txt pins {pin}{use}",
                 f"{_install(name, pins, needs)} to match the tested set "
                 f"(or keep {version} if your runs work).")


def _package(name: str, version: str | None, pins: dict[str, str], needs: dict[str, str],
             import_error: str | None) -> Check:
    if version is None:
        return Check(name, "missing", "not installed", f"{_install(name, pins, needs)}.")
    if import_error:
        return Check(name, "missing", f"{version} installed but does not import: {import_error}",
                     f"Reinstall it: pip install --force-reinstall '{name}=={version}'.")
    return _versioned(name, version, pins, needs, "missing")


def _import_torch():
    """(the torch module or None, why it did not import, preflight.torch_runtime() or {},
    what torch warned while looking for a GPU)."""
    try:
        import torch
    except Exception as exc:  # a broken build raises OSError or RuntimeError, not only ImportError
        return None, _short(exc), {}, ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime = preflight.torch_runtime()  # its torch.cuda.is_available() starts CUDA
    # torch says why CUDA did not start (a driver too old, ...) in a warning.
    said = "; ".join(dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught
                                   if str(w.message).strip()))
    return torch, None, runtime, said


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    text = text[0] if text else ""
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_NO_TORCH = "not probed: torch does not import"
_FIX_TORCH = "Fix the torch check above first."


# --- python ------------------------------------------------------------------------------

def _python(requires: str) -> Check:
    """requires: ftlaunch's Requires-Python ("" where unknown). pip installs ftlaunch only
    into such a Python, so this says which Python it is more than it ever fails."""
    detail = f"{platform.python_version()} ({sys.executable})"
    if SpecifierSet(requires).contains(platform.python_version(), prereleases=True):
        return Check("python", "ok", detail)
    return Check("python", "missing", f"{detail}; ftlaunch needs Python {requires}",
                 f"Install Python {requires} and install ftlaunch into it.")


# --- GPU ---------------------------------------------------------------------------------

def _cuda(torch, runtime: dict, said: str) -> Check:
    if torch is None:
        return Check("cuda", "warn", _NO_TORCH, _FIX_TORCH)
    hip = getattr(torch.version, "hip", None)
    cuda = runtime["torch_cuda"]
    build = f"CUDA {cuda}" if cuda else (f"ROCm {hip}" if hip else None)
    driver = preflight.gpu_driver()
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        devices = Counter(f"{torch.cuda.get_device_name(i)} "
                          f"({torch.cuda.get_device_properties(i).total_memory / GIB:.0f} GiB)"
                          for i in range(count))
        listed = ", ".join(f"{n} x {d}" if n > 1 else d for d, n in devices.items())
        return Check("cuda", "ok", f"{_count(count, 'GPU')}: {listed}; torch built with {build}"
                     f"{f', driver {driver}' if driver else ''}")
    seen = [line.strip() for line in nvidia_smi("name") or [] if line.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    version = runtime["torch"]
    slow = "ftlaunch trains on CPU worker processes (slow)"
    cpu_fix = ("For real models use a machine with an NVIDIA GPU and a CUDA build of torch; "
               "--model tiny and small models train here.")
    if visible in ("", "-1"):
        detail = f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU: {slow}"
        fix = "Unset CUDA_VISIBLE_DEVICES, or list the GPUs to use in it."
    elif build is None and seen:
        detail = (f"torch {version} is a CPU-only build, but nvidia-smi sees "
                  f"{_count(len(seen), 'GPU')} ({seen[0]}): {slow}")
        fix = ("Install the CUDA build of the same torch version for this driver (the command "
               "is at pytorch.org/get-started/locally).")
    elif build is None:
        detail = f"no CUDA GPU (torch {version} is a CPU-only build): {slow}"
        fix = cpu_fix
    elif seen:
        detail = (f"torch built with {build} cannot use the {_count(len(seen), 'GPU')} "
                  f"nvidia-smi sees{f' (driver {driver})' if driver else ''}: {slow}")
        fix = "Install a torch build whose CUDA version this driver supports, or update the driver."
    else:
        detail = f"no CUDA GPU (torch built with {build}): {slow}"
        fix = cpu_fix
    return Check("cuda", "warn", f"{detail}{f'; torch says: {said}' if said else ''}", fix)


def _capability(torch, on_gpu: bool) -> tuple[int, int] | None:
    return tuple(torch.cuda.get_device_capability(0)) if on_gpu else None


def _bf16(torch, on_gpu: bool) -> Check:
    if torch is None:
        return Check("bf16", "warn", _NO_TORCH, _FIX_TORCH)
    if not on_gpu:
        return Check("bf16", "warn", "no CUDA GPU: ftlaunch trains in fp32 on CPU",
                     "Nothing to do for CPU training; bf16 needs an NVIDIA GPU of the Ampere "
                     "generation or newer.")
    major, minor = _capability(torch, on_gpu)
    where = f"{torch.cuda.get_device_name(0)} (sm_{major}{minor})"
    # Native bf16 only: ftlaunch plans bf16 from sm_80 on; emulation is slow.
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return Check("bf16", "ok", f"supported by {where}")
    return Check("bf16", "warn", f"{where} has no native bf16: ftlaunch trains in fp16 "
                 "mixed precision", "For steadier bf16 training use an Ampere or newer GPU "
                 "(A100, A10, L4, H100, RTX 30xx/40xx).")


def _bitsandbytes(torch, on_gpu: bool, version: str | None, pins: dict[str, str],
                  needs: dict[str, str]) -> Check:
    if util.find_spec("bitsandbytes") is None:
        return Check("bitsandbytes", "warn", "not installed: --method qlora cannot run "
                     "(LoRA can)", f"{_install('bitsandbytes', pins, needs)} "
                     "(only --method qlora needs it).")
    if torch is None:
        return Check("bitsandbytes", "warn", _NO_TORCH, _FIX_TORCH)
    # Importing it is the probe (its native library loads then); what it prints or warns
    # while loading, such as its CPU backend missing an optional hub kernel, is not ours.
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes
    except Exception as exc:
        return Check("bitsandbytes", "warn", f"installed but does not import: {_short(exc)}",
                     "Reinstall it: pip install --force-reinstall bitsandbytes.")
    finally:
        logger.setLevel(level)
    version = version or str(getattr(bitsandbytes, "__version__", "version unknown"))
    lib = getattr(getattr(bitsandbytes, "cextension", None), "lib", None)
    if on_gpu and type(lib).__name__ == "ErrorHandlerMockBNBNativeLibrary":
        return Check("bitsandbytes", "warn", f"{version} imports but found no native library "
                     f"for torch's CUDA {torch.version.cuda}: --method qlora would fail",
                     "Reinstall bitsandbytes for this CUDA: pip install --force-reinstall "
                     "bitsandbytes.")
    use = ("QLoRA runs on the GPU" if on_gpu
           else "no CUDA GPU: QLoRA loads on CPU but runs slowly")
    return _versioned("bitsandbytes", version, pins, needs, "warn", use)


def _deepspeed(version: str | None, pins: dict[str, str], needs: dict[str, str]) -> Check:
    # Metadata only: importing deepspeed takes seconds and logs its accelerator guess.
    if version is None:
        return Check("deepspeed", "warn", "not installed: --engine deepspeed cannot run "
                     "(ddp and fsdp can)", f"{_install('deepspeed', pins, needs)} "
                     "(only --engine deepspeed needs it).")
    return _versioned("deepspeed", version, pins, needs, "warn")


def _nccl(torch, runtime: dict, on_gpu: bool) -> Check:
    if torch is None:
        return Check("nccl", "warn", _NO_TORCH, _FIX_TORCH)
    dist = torch.distributed
    official = "Install an official torch build (pip install torch)."
    if not dist.is_available():
        return Check("nccl", "warn", "this torch has no torch.distributed: multi-process "
                     "training (DDP, FSDP, several CPU workers) cannot run", official)
    nccl = dist.is_nccl_available()
    if on_gpu:
        if not nccl:
            return Check("nccl", "warn", "this torch build has no NCCL: multi-GPU training "
                         "cannot run (one GPU can)",
                         "Install a Linux CUDA build of torch, which bundles NCCL.")
        return Check("nccl", "ok", f"NCCL {runtime['nccl'] or 'version unknown'}: GPU "
                     "processes communicate over it")
    built = "built in, unused" if nccl else "not in this torch build"
    if dist.is_gloo_available():
        return Check("nccl", "ok", f"no CUDA GPU: CPU worker processes communicate over gloo "
                     f"(NCCL {built})")
    return Check("nccl", "warn", "neither NCCL nor gloo: several CPU workers cannot run "
                 "(one can)", official)


def _flash_attn(torch, on_gpu: bool, version: str | None) -> Check:
    try:
        found = util.find_spec("flash_attn") is not None
    except ValueError:  # a module object without a spec: treat as absent
        found = False
    capability = _capability(torch, on_gpu) if torch is not None else None
    ampere = capability is not None and capability >= (8, 0)
    if not found:
        if ampere:
            return Check("flash-attn", "warn", "not installed: SDPA attention is used",
                         "Optional, faster on packed rows on this GPU: pip install flash-attn "
                         "--no-build-isolation.")
        return Check("flash-attn", "ok", "not installed: SDPA attention is used (flash-attn "
                     "would need an Ampere or newer GPU)")
    version = version or "version unknown"
    if ampere:
        return Check("flash-attn", "ok", f"{version}: used for bf16/fp16 training on this GPU")
    return Check("flash-attn", "ok", f"{version}, unused here (it needs an Ampere or newer GPU): "
                 "SDPA attention is used")


# --- machine -----------------------------------------------------------------------------

def _disk(output_dir: Path) -> Check:
    target = output_dir.expanduser()
    try:
        rundir.check_writable(target)  # what a run checks first, with a real file
    except UserError as exc:
        # Its message is what is wrong, then one sentence saying what to do.
        detail, _, fix = str(exc).rpartition(". ")
        return Check("disk", "missing", detail or str(exc), fix)
    try:
        probe, free = free_disk(target)
    except OSError as exc:
        return Check("disk", "missing", f"cannot measure free space for {target}: {_short(exc)}",
                     "Pass an --output-dir on a mounted filesystem you can write to.")
    gib = f"{free / GIB:.1f} GiB free"
    # The run folder may not exist yet: what counts is the nearest folder that does.
    for_target = "" if probe == target.resolve() else f" (for {target})"
    if free < DISK_WARN_BYTES:
        return Check("disk", "warn", f"{gib} at {probe}{for_target}, under "
                     f"{DISK_WARN_BYTES // GIB} GiB", "Free space there or pass an --output-dir "
                     "on a larger filesystem (each run checks what it needs before it starts).")
    return Check("disk", "ok", f"{gib} at {probe}{for_target}")


def _ram() -> Check:
    memory = psutil.virtual_memory()
    detail = (f"{memory.available / GIB:.1f} GiB available of {memory.total / GIB:.1f} GiB "
              "total")
    if memory.available < RAM_WARN_BYTES:
        return Check("ram", "warn", f"{detail}, under {RAM_WARN_BYTES // GIB} GiB",
                     "Close other programs to free memory (each run checks the RAM it needs "
                     "before it starts).")
    return Check("ram", "ok", detail)


def _hf_hub() -> Check:
    """As huggingface_hub itself sees it: its constants, read from the environment when it
    was imported. Only whether token variables are set is said: the token is never read."""
    if hub_constants.HF_HUB_OFFLINE:
        mode = ("offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set): models and data come "
                "from the local cache only")
    else:
        mode = "online (HF_HUB_OFFLINE not set or false)"
    named = [var for var in _TOKEN_VARS if os.environ.get(var, "").strip()]
    if named:
        token = f"token: set ({', '.join(named)})"
    elif Path(hub_constants.HF_TOKEN_PATH).is_file():
        token = "token: not set in the environment; a saved login token file exists"
    else:
        token = "token: not set (gated models such as Llama need HF_TOKEN or `hf auth login`)"
    return Check("hf-hub", "ok", f"{mode}; {token}")


# --- text --------------------------------------------------------------------------------

def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _wrap(text: str, first: str, rest: str) -> list[str]:
    return textwrap.wrap(text, _WIDTH, initial_indent=first, subsequent_indent=rest,
                         break_long_words=False, break_on_hyphens=False) or [first.rstrip()]
