"""Secure defaults, on real runs: no secret from the environment lands in any file of a
run directory; files follow the user's umask; user input never reaches a shell; remote
code stays off unless asked; trackers get their settings passed through."""

from __future__ import annotations

import ast
import dataclasses
import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import FTLAUNCH, TINY_TRAIN, assert_user_error, run_ftlaunch
from ftlaunch.run import directory as rundir
from ftlaunch.run import record as run_record

SECRETS = {"HF_TOKEN": "hf_SeCrEtToKeN0123456789abcdef",
           "HUGGING_FACE_HUB_TOKEN": "hf_OtherSecret9876543210fedcba",
           "WANDB_API_KEY": "wandbsecret0123456789abcdef0123456789abcd",
           "MY_SERVICE_PASSWORD": "correct-horse-battery-staple-42"}
LAUNCHER_SOURCE = Path(__file__).resolve().parents[1] / "launcher"


# Shell syntax in the run directory's name: launched for real, it must stay a literal path.
HOSTILE_NAME = "run $(touch PWNED); `touch PWNED2` 'q"


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory):
    """A real tiny training (with a held-out eval split, so evaluation runs too) under a
    umask of 027, with secrets in its environment, into a directory named like a shell
    command."""
    root = tmp_path_factory.mktemp("secret")
    run_dir = root / HOSTILE_NAME
    proc = subprocess.run([FTLAUNCH, *TINY_TRAIN, "--eval-split", "0.1", "--output-dir",
                           str(run_dir)], capture_output=True, text=True, timeout=600, cwd=root,
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


# 022 only: the run under 027 above already shows nothing is made more open than the
# umask, and test_modes_follow_the_umask_exactly covers 077 without another training.
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644)])
def test_weights_follow_the_umask(tmp_path, umask, mode):
    """safetensors writes 0600 whatever the umask: the adapter, every checkpoint and a merged
    model get what the umask implies (readable by teammates and serving users under 022),
    and checkpoints still verify (their modes are set before they are checksummed)."""
    from ftlaunch.run import checkpoints

    run_dir = tmp_path / "run"
    umask_of = {"preexec_fn": lambda: os.umask(umask), "capture_output": True, "text": True,
                "timeout": 600}
    proc = subprocess.run([FTLAUNCH, "--model", "tiny", "--gpus", "1", "--max-steps", "2",
                           "--global-batch-size", "2", "--seq-len", "64", "--set",
                           "save_steps=1", "--output-dir", str(run_dir)], **umask_of)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    merged = subprocess.run([FTLAUNCH, "merge", str(run_dir)], **umask_of)
    assert merged.returncode == 0, merged.stdout + merged.stderr
    saved = [run_dir / "adapter", *(run_dir / "checkpoints").glob("checkpoint-*"),
             run_dir / "merged"]
    files = [p for folder in saved for p in folder.rglob("*") if p.is_file()]
    assert {folder.name for folder in saved} >= {"adapter", "checkpoint-1", "merged"}
    assert sum(p.suffix == ".safetensors" for p in files) >= 3, files
    wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != mode}
    assert not wrong, f"not {oct(mode)} under umask {oct(umask)}: {wrong}"
    assert checkpoints.verify(run_dir / "checkpoints" / "checkpoint-1")[0] is None


def test_modes_follow_the_umask_exactly(tmp_path):
    """What safetensors made private, and what another library made too open, both end as
    the umask implies; an executable stays executable (DeepSpeed's zero_to_fp32.py)."""
    from ftlaunch import filemodes

    (tmp_path / "sub").mkdir()
    made = {"w.safetensors": 0o600, "open.json": 0o666, "sub/zero_to_fp32.py": 0o700}
    for name, mode in made.items():
        (tmp_path / name).write_text("x")
        os.chmod(tmp_path / name, mode)
    previous = os.umask(0o027)
    try:
        assert filemodes.current_umask() == 0o027
        filemodes.follow_umask(tmp_path)
    finally:
        os.umask(previous)
    assert {name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in made} == {
        "w.safetensors": 0o640, "open.json": 0o640, "sub/zero_to_fp32.py": 0o750}


def test_a_credential_given_as_a_setting_is_refused(tmp_path):
    proc = run_ftlaunch("--model", "tiny", "--dry-run", "--output-dir", str(tmp_path / "run"),
                        "--set", f"hub_token={SECRETS['HF_TOKEN']}")
    assert_user_error(proc, "HF_TOKEN=...", forbidden=(SECRETS["HF_TOKEN"],))
    assert not (tmp_path / "run").exists()


def test_no_shell_anywhere_in_the_launcher():
    """No subprocess with shell=True, no shell-running helper: every command is an argv list."""
    for source in LAUNCHER_SOURCE.glob("*.py"):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                assert name not in ("os.system", "os.popen", "subprocess.getoutput",
                                    "subprocess.getstatusoutput",
                                    "asyncio.create_subprocess_shell"), f"{source.name}: {name}"
                for keyword in node.keywords:
                    assert not (keyword.arg == "shell" and ast.unparse(keyword.value) != "False"), \
                        f"{source.name}:{node.lineno} runs a shell"


def test_shell_characters_in_paths_stay_literal(secret_run):
    """The real run into a directory named like a shell command trained there, and nothing
    it launched ran the command; the printed launch line quotes it back."""
    proc, run_dir = secret_run
    assert run_dir.name == HOSTILE_NAME and rundir.is_finished(run_dir)
    assert not list(run_dir.parent.rglob("PWNED*"))
    printed = next(line for line in proc.stdout.splitlines() if line.startswith("Launching"))
    argv = shlex.split(printed.split(": ", 1)[1])
    assert argv[argv.index("--run-dir") + 1] == str(run_dir)


def test_remote_code_is_off_unless_asked(tmp_path):
    """A hub-style model folder: run.yaml, which is all the workers read, records
    trust_remote_code false by default and true only with --trust-remote-code."""
    import json

    folder = tmp_path / "my-model"
    folder.mkdir()
    from ftlaunch.models.builtin import hf_config

    (folder / "config.json").write_text(json.dumps(hf_config("tiny")), encoding="utf-8")
    for extra, expected in (([], False), (["--trust-remote-code"], True)):
        out = tmp_path / f"run-{expected}"
        proc = run_ftlaunch("--model", str(folder), "--random-init", "--dry-run",
                            "--output-dir", str(out), *extra, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert run_record.load(out).model.trust_remote_code is expected


def test_report_to_reaches_the_trainer(tiny_run, monkeypatch):
    from ftlaunch.worker.setup import training_config

    run_dir = tiny_run[1]
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    record = run_record.load(run_dir)
    assert training_config(run_dir, record).report_to in ([], ["none"], "none")
    record = dataclasses.replace(record, trainer={**record.trainer, "report_to": ["tensorboard"]})
    assert training_config(run_dir, record).report_to == ["tensorboard"]
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(run_dir / "tensorboard")


def test_every_tracker_of_transformers_and_only_those():
    """--report-to's table is transformers' own list of integrations."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    from ftlaunch.detect import runtime

    assert set(runtime.REPORTERS) == set(INTEGRATION_TO_CALLBACK)
