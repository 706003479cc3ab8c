"""Secure defaults, on real runs: no secret from the environment lands in any file of a
run directory; files follow the user's umask; user input never reaches a shell; remote
code stays off unless asked; trackers get their settings passed through."""

from __future__ import annotations

import ast
import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import FTLAUNCH, TINY_TRAIN
from ftlaunch import rundir

SECRETS = {"HF_TOKEN": "hf_SeCrEtToKeN0123456789abcdef",
           "HUGGING_FACE_HUB_TOKEN": "hf_OtherSecret9876543210fedcba",
           "WANDB_API_KEY": "wandbsecret0123456789abcdef0123456789abcd",
           "MY_SERVICE_PASSWORD": "correct-horse-battery-staple-42"}
LAUNCHER_SOURCE = Path(__file__).resolve().parents[1] / "launcher"


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory):
    """A real tiny training (with a held-out eval split, so evaluation runs too) under a
    umask of 027, with secrets in its environment."""
    run_dir = tmp_path_factory.mktemp("secret") / "run"
    proc = subprocess.run([FTLAUNCH, *TINY_TRAIN, "--eval-split", "0.1", "--output-dir",
                           str(run_dir)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **SECRETS}, preexec_fn=lambda: os.umask(0o027))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, run_dir


def test_no_secret_from_the_environment_in_any_file_of_the_run(secret_run):
    proc, run_dir = secret_run
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 20 and any(p.suffix == ".bin" for p in files)  # pickles included
    for path in files:
        data = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in data, f"{name}'s value is in {path}"
    for name, value in SECRETS.items():
        assert value not in proc.stdout + proc.stderr, f"{name}'s value was printed"


def test_run_files_follow_the_umask(secret_run):
    _, run_dir = secret_run
    for path in [run_dir, *run_dir.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert not mode & 0o027, f"{path} is {oct(mode)} under umask 027"
    # Not merely private: what ftlaunch creates gets what the umask leaves.
    assert stat.S_IMODE((run_dir / rundir.RUN_FILE).stat().st_mode) == 0o640
    assert stat.S_IMODE((run_dir / "checkpoints").stat().st_mode) == 0o750


def test_a_credential_given_as_a_setting_is_refused(tmp_path):
    proc = subprocess.run([FTLAUNCH, "--model", "tiny", "--dry-run", "--output-dir",
                           str(tmp_path / "run"), "--set", f"hub_token={SECRETS['HF_TOKEN']}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "HF_TOKEN=..." in proc.stderr
    assert SECRETS["HF_TOKEN"] not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()


def test_no_shell_anywhere_in_the_launcher():
    """No subprocess with shell=True, no os.system/os.popen: every command is an argv list."""
    for source in LAUNCHER_SOURCE.glob("*.py"):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                assert name not in ("os.system", "os.popen"), f"{source.name}: {name}"
                for keyword in node.keywords:
                    assert not (keyword.arg == "shell" and ast.unparse(keyword.value) != "False"), \
                        f"{source.name}:{node.lineno} runs a shell"


def test_shell_characters_in_paths_stay_literal(tmp_path):
    hostile = tmp_path / "run $(touch PWNED); `touch PWNED2` 'q"
    proc = subprocess.run([FTLAUNCH, "--model", "tiny", "--gpus", "1", "--dry-run",
                           "--output-dir", str(hostile)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.split("Launch command (dry run, nothing trained):\n")[1].splitlines()[0]
    argv = shlex.split(printed)
    assert argv[argv.index("--run-dir") + 1] == str(hostile)
    assert (hostile / "accelerate.yaml").is_file()
    assert not list(tmp_path.rglob("PWNED*"))


def test_remote_code_is_off_unless_asked(tmp_path):
    """A hub-style model folder: run.yaml records trust_remote_code false by default and
    true only with --trust-remote-code; the workers read that (train._load_model)."""
    import json

    folder = tmp_path / "my-model"
    folder.mkdir()
    from ftlaunch.builtin_models import hf_config

    (folder / "config.json").write_text(json.dumps(hf_config("tiny")), encoding="utf-8")
    for extra, expected in (([], False), (["--trust-remote-code"], True)):
        out = tmp_path / f"run-{expected}"
        proc = subprocess.run([FTLAUNCH, "--model", str(folder), "--random-init", "--dry-run",
                               "--output-dir", str(out), *extra], capture_output=True, text=True,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert rundir.read_run_file(out)["model"]["trust_remote_code"] is expected


def test_report_to_reaches_the_trainer(tiny_run, monkeypatch):
    from ftlaunch import train

    run_dir = tiny_run[1]
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "unset below")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR")
    record = rundir.read_run_file(run_dir)
    assert train._training_config(run_dir, record, False).report_to in ([], ["none"], "none")
    record["recipe"]["training"]["report_to"] = ["tensorboard"]
    assert train._training_config(run_dir, record, False).report_to == ["tensorboard"]
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(run_dir / "tensorboard")


def test_a_recipe_finds_its_files_beside_it_from_any_folder(tmp_path):
    from ftlaunch import recipes

    (tmp_path / "proj" / "data").mkdir(parents=True)
    recipe_file = tmp_path / "proj" / "r.yaml"
    recipe_file.write_text("data:\n  eval_data: data/eval.jsonl\n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    try:
        os.chdir(elsewhere)
        recipe = recipes.load_recipe(str(recipe_file))
    finally:
        os.chdir(cwd)
    assert recipe.data["eval_data"] == str(tmp_path / "proj" / "data" / "eval.jsonl")
