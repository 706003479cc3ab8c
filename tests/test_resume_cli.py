"""`ftlaunch resume RUN_DIR`: the recorded command, from the recorded directory."""

from __future__ import annotations

import json
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
    first = subprocess.run([FTLAUNCH, "--model", "tiny", "--gpus", "1", "--data", "train.jsonl",
                            "--max-steps", "3", "--seq-len", "64", "--output-dir", "run",
                            "--dry-run"], cwd=project, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    # From another directory, with a flag changed: the relative --data still resolves, the
    # run directory is the one named, and the changed flag wins over the recorded one.
    again = subprocess.run([FTLAUNCH, "resume", str(project / "run"), "--max-steps", "5"],
                           cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    record = yaml.safe_load((project / "run" / "run.yaml").read_text())
    assert record["data"]["path"] == str(project / "train.jsonl")
    rank = json.loads((project / "run" / "ranks" / "rank-0.json").read_text())
    assert rank["global_step"] == 5
    assert not (elsewhere / "run").exists() and not (project / "run" / "run").exists()
