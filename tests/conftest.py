"""Shared test setup: offline, a private ftlaunch cache, and the real console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FTLAUNCH = str(Path(sys.executable).parent / "ftlaunch")


@pytest.fixture(scope="session", autouse=True)
def offline_cache(tmp_path_factory) -> Path:
    """Nothing is downloaded in tests, and built models go to a cache of the session's own."""
    cache = tmp_path_factory.mktemp("ftlaunch-cache")
    os.environ["FTLAUNCH_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    return cache


def run_ftlaunch(*args: str, cwd: Path | None = None, timeout: int = 600,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([FTLAUNCH, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def has_cuda() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
