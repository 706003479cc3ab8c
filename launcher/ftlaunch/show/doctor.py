"""`ftlaunch doctor`: what this machine lacks for fine-tuning, said before a run finds out.

A run fails late and far from the cause: a missing trl is an ImportError in every
worker, a CPU-only torch build a plan a hundred times slower than expected, a read-only
output folder an error after the data is tokenized. Each check here is the cheap, real
probe of what a run would hit, with the fix beside it. "missing" is kept for what stops
every run (exit code 1); what only some methods or engines need (a GPU, bitsandbytes,
deepspeed, flash-attn) is a warning, since ftlaunch still trains without it.

This module runs the checks and renders them; the checks are in doctor_checks.py (Check,
and those without torch) and doctor_torch.py (those torch answers).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from ftlaunch.detect.runtime import package_versions
from ftlaunch.show import doctor_checks
from ftlaunch.show import doctor_torch
from ftlaunch.show.doctor_checks import Check, counted

CORE_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")

_WIDTH = 100
_NAME_WIDTH = 14
_DETAIL_INDENT = " " * (2 + 8 + 1 + _NAME_WIDTH + 1)
_FIX_PREFIX = " " * 11 + "-> fix: "


def run_checks(output_dir: Path) -> list[Check]:
    """Every check: python, the core packages, cuda, bf16, bitsandbytes, deepspeed, nccl,
    flash-attn, disk, ram, hf-hub. Imports torch (and bitsandbytes where installed):
    a few seconds on CPU."""
    pins = doctor_checks.read_pins()
    requires_python, needs = doctor_checks.declared_requirements()
    versions = package_versions((*CORE_PACKAGES, "bitsandbytes", "deepspeed", "flash-attn"))
    torch, torch_error, runtime, said = doctor_torch.import_torch()
    if torch is not None:
        versions["torch"] = runtime["torch"]  # the build that imports, as run.yaml records it
    checks = [doctor_checks.python_check(requires_python)]
    checks += [doctor_checks.package_check(name, versions[name], pins, needs,
                                           torch_error if name == "torch" else None)
               for name in CORE_PACKAGES]
    cuda = doctor_torch.cuda_check(torch, runtime, said)
    on_gpu = cuda.status == "ok"
    checks += [
        cuda,
        doctor_torch.bf16_check(torch, on_gpu),
        doctor_torch.bitsandbytes_check(torch, on_gpu, versions["bitsandbytes"], pins, needs),
        doctor_checks.deepspeed_check(versions["deepspeed"], pins, needs),
        doctor_torch.nccl_check(torch, runtime, on_gpu),
        doctor_torch.flash_attn_check(torch, on_gpu, versions["flash-attn"]),
        doctor_checks.disk_check(Path(output_dir)),
        doctor_checks.ram_check(),
        doctor_checks.hub_check(),
    ]
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
            parts.append(f"{counted(len(packages), 'essential package')} missing "
                         f"({', '.join(packages)})")
        if others:
            parts.append(f"{counted(len(others), 'essential check')} failed ({', '.join(others)})")
        return f"Not ready: {'; '.join(parts)}."
    warned = sum(c.status == "warn" for c in checks)
    on_gpu = any(c.name == "cuda" and c.status == "ok" for c in checks)
    where = "on GPU" if on_gpu else "on CPU"
    return f"Ready to train {where}" + (f" ({counted(warned, 'warning')})." if warned else ".")


def _wrap(text: str, first: str, rest: str) -> list[str]:
    return textwrap.wrap(text, _WIDTH, initial_indent=first, subsequent_indent=rest,
                         break_long_words=False, break_on_hyphens=False) or [first.rstrip()]
