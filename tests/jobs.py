"""Running real ftlaunch jobs from tests: start one as a scheduler would, watch its files,
stop it with real signals (or have a worker meet a fault at a chosen step: fault_env),
and compare what it trained."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import psutil

from conftest import FTLAUNCH


def start(*args: str, log: Path) -> subprocess.Popen:
    """The launcher in a process group of its own, as a scheduler starts a job."""
    with open(log, "ab") as out:
        return subprocess.Popen([FTLAUNCH, *args], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def job_processes(launcher: subprocess.Popen) -> list[psutil.Process]:
    try:
        return [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def power_loss(launcher: subprocess.Popen, procs: list[psutil.Process] | None = None) -> None:
    """SIGKILL every process of the job at once: nothing gets to clean up."""
    procs = procs or job_processes(launcher)
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    launcher.wait(timeout=30)
    psutil.wait_procs(procs, timeout=30)


def wait(predicate, launcher: subprocess.Popen, timeout: float = 300, poll: float = 0.002):
    """True once predicate() holds; False if the launcher ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if launcher.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError("timed out waiting for the run")


def logged_steps(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return max(steps, default=0)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    import torch

    left, right = adapter(a), adapter(b)
    assert sorted(left) == sorted(right)
    different = [name for name in left if not torch.equal(left[name], right[name])]
    assert not different, f"{len(different)} adapter tensors differ, e.g. {different[:3]}"


FAULTS = str(Path(__file__).parent / "faults")


def fault_env(kind: str, step: int, once: Path | None = None, rank: int = 0) -> dict:
    """The environment that makes worker `rank` meet a fault (raise, sigkill, sigstop) at
    `step`: tests/faults/sitecustomize.py, loaded by every process from PYTHONPATH. With
    `once` (a file that must not exist yet), only the first launch meets it."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [FAULTS, os.environ.get("PYTHONPATH")])),
           "FTLAUNCH_TEST_FAULT": kind, "FTLAUNCH_TEST_FAULT_STEP": str(step),
           "FTLAUNCH_TEST_FAULT_RANK": str(rank)}
    if once is not None:
        env["FTLAUNCH_TEST_FAULT_ONCE"] = str(once)
    return env


def restart_lines(out: str) -> list[str]:
    """The launcher's announcements of in-job restarts."""
    return [line for line in out.splitlines() if line.startswith("ftlaunch: restart ")]
