"""The doctor's Check, and the checks that need no torch: python, the packages against
ftlaunch's declared ranges and constraints.txt's pins, deepspeed (its metadata only),
the output folder's disk, RAM, and Hugging Face Hub access. The checks torch answers
are in doctor_torch.py; `ftlaunch doctor` runs both (doctor.py).
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil
from huggingface_hub import constants as hub_constants
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import Specifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from ftlaunch.detect.hardware import free_disk
from ftlaunch.errors import UserError
from ftlaunch.resources import constraints_path
from ftlaunch.run import directory as rundir
from ftlaunch.units import GIB

STATUSES = ("ok", "warn", "missing")
# Below this a 7-8B run's checkpoints and data cache may not fit; each run still checks
# what it needs itself (launch/preflight.py's check_disk), so this is only a warning.
DISK_WARN_BYTES = 20 * GIB
# Twice what one GPU worker holds in libraries before any model (about 2 GiB, preflight's
# figure): below it even a small model is tight. Each run checks the RAM it needs itself
# (launch/preflight.py's check_ram), so this is only a warning.
RAM_WARN_BYTES = 4 * GIB
_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


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


# --- packages ----------------------------------------------------------------------------

def read_pins() -> dict[str, str]:
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


def declared_requirements() -> tuple[str, dict[str, str]]:
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


def install_command(name: str, pins: dict[str, str], needs: dict[str, str]) -> str:
    """The pip command that installs `name` as ftlaunch wants it: the pinned version,
    else its declared range."""
    pin = pins.get(canonicalize_name(name))
    spec = f"=={pin}" if pin else needs.get(canonicalize_name(name), "")
    return f"pip install '{name}{spec}'" if spec else f"pip install {name}"


def version_check(name: str, version: str, pins: dict[str, str], needs: dict[str, str],
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
                     f"{install_command(name, pins, needs)}.")
    pin = pins.get(canonicalize_name(name))
    use = f"; {use}" if use else ""
    if pin is None:
        return Check(name, "ok", f"{version}{use}")
    # As pip -c would judge it: a pin without a local label admits any build (+cpu, +cu128).
    if parsed is not None and Specifier(f"=={pin}").contains(parsed, prereleases=True):
        return Check(name, "ok", f"{version} (pinned {pin}){use}")
    return Check(name, "warn", f"{version}, but constraints.txt pins {pin}{use}",
                 f"{install_command(name, pins, needs)} to match the tested set "
                 f"(or keep {version} if your runs work).")


def package_check(name: str, version: str | None, pins: dict[str, str],
                  needs: dict[str, str], import_error: str | None) -> Check:
    """A core package: missing when not installed, when it does not import, or when its
    version is outside ftlaunch's range."""
    if version is None:
        return Check(name, "missing", "not installed", f"{install_command(name, pins, needs)}.")
    if import_error:
        return Check(name, "missing", f"{version} installed but does not import: {import_error}",
                     f"Reinstall it: pip install --force-reinstall '{name}=={version}'.")
    return version_check(name, version, pins, needs, "missing")


def deepspeed_check(version: str | None, pins: dict[str, str], needs: dict[str, str]) -> Check:
    # Metadata only: importing deepspeed takes seconds and logs its accelerator guess.
    if version is None:
        return Check("deepspeed", "warn", "not installed: --engine deepspeed cannot run "
                     "(ddp and fsdp can)", f"{install_command('deepspeed', pins, needs)} "
                     "(only --engine deepspeed needs it).")
    return version_check("deepspeed", version, pins, needs, "warn")


# --- python ------------------------------------------------------------------------------

def python_check(requires: str) -> Check:
    """requires: ftlaunch's Requires-Python ("" where unknown). pip installs ftlaunch only
    into such a Python, so this says which Python it is more than it ever fails."""
    detail = f"{platform.python_version()} ({sys.executable})"
    if SpecifierSet(requires).contains(platform.python_version(), prereleases=True):
        return Check("python", "ok", detail)
    return Check("python", "missing", f"{detail}; ftlaunch needs Python {requires}",
                 f"Install Python {requires} and install ftlaunch into it.")


# --- machine -----------------------------------------------------------------------------

def disk_check(output_dir: Path) -> Check:
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
        return Check("disk", "missing",
                     f"cannot measure free space for {target}: {short_error(exc)}",
                     "Pass an --output-dir on a mounted filesystem you can write to.")
    gib = f"{free / GIB:.1f} GiB free"
    # The run folder may not exist yet: what counts is the nearest folder that does.
    for_target = "" if probe == target.resolve() else f" (for {target})"
    if free < DISK_WARN_BYTES:
        return Check("disk", "warn", f"{gib} at {probe}{for_target}, under "
                     f"{DISK_WARN_BYTES // GIB} GiB", "Free space there or pass an --output-dir "
                     "on a larger filesystem (each run checks what it needs before it starts).")
    return Check("disk", "ok", f"{gib} at {probe}{for_target}")


def ram_check() -> Check:
    memory = psutil.virtual_memory()
    detail = (f"{memory.available / GIB:.1f} GiB available of {memory.total / GIB:.1f} GiB "
              "total")
    if memory.available < RAM_WARN_BYTES:
        return Check("ram", "warn", f"{detail}, under {RAM_WARN_BYTES // GIB} GiB",
                     "Close other programs to free memory (each run checks the RAM it needs "
                     "before it starts).")
    return Check("ram", "ok", detail)


def hub_check() -> Check:
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

def short_error(exc: BaseException) -> str:
    """An exception as one line of at most 160 characters, led by its type."""
    text = str(exc).strip().splitlines()
    text = text[0] if text else ""
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def counted(n: int, noun: str) -> str:
    """"1 GPU", "2 GPUs"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
