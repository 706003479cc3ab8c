"""`ftlaunch resume RUN_DIR`: the recorded command, from the recorded directory."""

from __future__ import annotations

import shutil
import subprocess

import yaml

from conftest import FTLAUNCH
from ftlaunch.resources import demo_data_path


def test_resume_reruns_the_recorded_command_from_its_directory(tmp_path):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    shutil.copy(demo_data_path(), project / "train.jsonl")
    first = subprocess.run([FTLAUNCH, "--model", "tiny", "--data", "train.jsonl", "--max-steps",
                            "3", "--output-dir", "run", "--dry-run"], cwd=project,
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    # From another directory, with a flag changed: the relative --data still resolves and
    # the run directory is the one named, whatever the recorded --output-dir said.
    again = subprocess.run([FTLAUNCH, "resume", str(project / "run"), "--max-steps", "5",
                            "--dry-run"], cwd=elsewhere, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "ftlaunch resume: ftlaunch --model tiny --data train.jsonl --max-steps 3 --output-dir " \
           f"run --max-steps 5 --dry-run --output-dir {project / 'run'}" in again.stdout
    assert f"--run-dir {project / 'run'}" in again.stdout
    record = yaml.safe_load((project / "run" / "run.yaml").read_text())
    assert record["data"]["path"] == str(project / "train.jsonl")
    assert not (elsewhere / "run").exists()
