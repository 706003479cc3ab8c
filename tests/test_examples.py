"""docs/examples: valid scripts, flags that exist, and the spot loop's exit-code logic."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from ftlaunch.cli import parse_duration
from ftlaunch.cli import train

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def _parses_as_train(args: list[str]) -> dict:
    with train.make_context("ftlaunch", list(args)) as ctx:
        return dict(ctx.params)


def _ftlaunch_line(script: Path) -> list[str]:
    text = script.read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if "ftlaunch --model" in line)
    args = shlex.split(line.split("ftlaunch", 1)[1].replace('"$@"', ""))
    return [a.replace('"', "") for a in args]


@pytest.mark.parametrize("name", ["spot-loop.sh", "slurm-single-node.sbatch"])
def test_shell_examples_are_valid_and_use_real_flags(name):
    script = EXAMPLES / name
    subprocess.run(["bash", "-n", str(script)], check=True)
    params = _parses_as_train(_ftlaunch_line(script))
    assert parse_duration(params["grace"], "--grace") > 0


def test_slurm_signal_comes_early_enough_for_the_grace():
    script = (EXAMPLES / "slurm-single-node.sbatch").read_text()
    signal_line = next(line for line in script.splitlines() if "--signal=" in line)
    warning = int(signal_line.rsplit("@", 1)[1])
    assert "B:TERM" in signal_line and "exec ftlaunch" in script
    params = _parses_as_train(_ftlaunch_line(EXAMPLES / "slurm-single-node.sbatch"))
    grace = parse_duration(params["grace"], "--grace")
    assert warning > grace


def test_kubernetes_job_gives_ftlaunch_its_grace_and_restarts_on_75():
    (job,) = yaml.safe_load_all((EXAMPLES / "k8s-job.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][0] == "ftlaunch"  # exec form: ftlaunch is PID 1
    params = _parses_as_train(container["command"][1:])
    assert pod["terminationGracePeriodSeconds"] > parse_duration(params["grace"], "--grace")
    rules = {rule["action"]: rule["onExitCodes"]["values"]
             for rule in job["spec"]["podFailurePolicy"]["rules"]}
    assert rules == {"Ignore": [75], "FailJob": [2]}


def _loop(tmp_path, codes: list[int]) -> tuple[int, list[str]]:
    """Run spot-loop.sh with a stand-in ftlaunch that exits with `codes` in turn."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    calls = tmp_path / "calls"
    fake = bin_dir / "ftlaunch"
    fake.write_text("#!/bin/bash\n"
                    f"echo \"$*\" >> {calls}\n"
                    f"n=$(wc -l < {calls})\n"
                    f"codes=({' '.join(map(str, codes))})\n"
                    "exit ${codes[$((n - 1))]}\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PAUSE_SECONDS": "0"}
    proc = subprocess.run(["bash", str(EXAMPLES / "spot-loop.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    return proc.returncode, calls.read_text().splitlines()


def test_spot_loop_resumes_after_preemption_and_kills_until_done(tmp_path):
    code, calls = _loop(tmp_path, [75, 137, 143, 0])
    assert code == 0 and len(calls) == 4
    assert len(set(calls)) == 1  # the same command every time


def test_spot_loop_gives_up_on_user_errors_and_repeated_failures(tmp_path):
    code, calls = _loop(tmp_path / "a", [2])
    assert code == 2 and len(calls) == 1
    code, calls = _loop(tmp_path / "b", [1, 1, 1, 0])
    assert code == 1 and len(calls) == 3
