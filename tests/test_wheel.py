"""The built wheel is self-contained: recipes and templates inside, usable outside the tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
_SKIP = {".git", ".venv", "runs", "build", "dist", ".pytest_cache", "__pycache__", ".cache"}


def _run(argv, **kwargs):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=lambda d, names: [
        n for n in names if n in _SKIP or n.endswith(".egg-info")])
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "-w", str(dist), str(source)])
    wheel = next(dist.glob("ftlaunch-*.whl"))

    # A fresh venv holding only the wheel; the heavy dependencies come from the test
    # venv's site-packages as a plain path entry (its .pth files, including the
    # editable ftlaunch, are not processed from there).
    venv = tmp_path / "venv"
    _run([sys._base_executable, "-m", "venv", str(venv)])
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index",
          str(wheel)])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run([str(venv / "bin" / "python"), "-c",
                  "import ftlaunch, ftlaunch.resources as r; print(ftlaunch.__file__); "
                  "print(r.recipes_dir()); print(r.accelerate_templates_dir())"],
                 cwd=elsewhere, env=env).stdout.split()
    assert all(p.startswith(str(site)) for p in where), where

    ftlaunch = str(venv / "bin" / "ftlaunch")
    listing = _run([ftlaunch, "recipes"], cwd=elsewhere, env=env).stdout
    assert "default" in listing and "llama-3.1-8b" in listing

    out = _run([ftlaunch, "--model", "tiny", "--gpus", "auto", "--dry-run",
                "--output-dir", str(elsewhere / "run")], cwd=elsewhere, env=env).stdout
    assert "accelerate.commands.launch" in out
    assert (elsewhere / "run" / "accelerate.yaml").is_file()
    assert (elsewhere / "run" / "run.yaml").is_file()
