"""The real `ftlaunch` console script: user errors end in one paragraph and exit 2, never a
traceback; help, hardware, recipes and a dry run work.

Every command here runs as a subprocess of the installed script, offline, with its cache in
a temporary directory and its working directory in tmp_path (so no runs/ lands in the tree).
The full bad-input matrix (with an existing run checked untouched) is tests/test_bad_input.py;
the errors here also check that a new --output-dir is not created.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import USER_ERROR, assert_user_error, cores
from ftlaunch.stop_flags import parse_duration
from ftlaunch.errors import UserError

FTLAUNCH = Path(sys.executable).parent / "ftlaunch"


@pytest.fixture
def ftlaunch(cli_env, tmp_path):
    def run(*args, timeout=120):
        return subprocess.run([str(FTLAUNCH), *map(str, args)], env=cli_env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=timeout)
    return run


def test_console_script_is_installed():
    assert FTLAUNCH.is_file()
    assert os.access(FTLAUNCH, os.X_OK)


# --- user errors --------------------------------------------------------------------------

def test_unknown_model(ftlaunch, tmp_path):
    out = tmp_path / "run"
    result = ftlaunch("--model", "nosuchmodel", "--dry-run", "--output-dir", out)
    assert_user_error(result, "nosuchmodel", "tiny")
    assert not out.exists()




def test_missing_data_file(ftlaunch, tmp_path):
    out = tmp_path / "run"
    result = ftlaunch("--model", "tiny", "--data", "/nonexistent.jsonl", "--dry-run",
                      "--output-dir", out)
    assert_user_error(result, "/nonexistent.jsonl")
    assert not out.exists()


def test_bad_data_line_is_reported_before_anything_is_written(ftlaunch, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    out = tmp_path / "run"
    result = ftlaunch("--model", "tiny", "--data", data, "--dry-run", "--output-dir", out)
    assert_user_error(result, str(data), "line 3")
    assert not out.exists()


def test_zero_gpus(ftlaunch, tmp_path):
    out = tmp_path / "run"
    result = ftlaunch("--model", "tiny", "--gpus", "0", "--dry-run", "--output-dir", out)
    assert_user_error(result, "--gpus 0")
    assert not out.exists()


def test_too_many_gpus_here(ftlaunch, tmp_path):
    out = tmp_path / "run"
    result = ftlaunch("--model", "tiny", "--gpus", "99", "--dry-run", "--output-dir", out)
    assert_user_error(result, "--gpus 99")
    assert not out.exists()




def test_too_many_gpus_for_described_hardware(ftlaunch):
    result = ftlaunch("plan", "--hardware", "1xA100-80GB", "--gpus", "3", "--model", "tiny")
    assert_user_error(result, "--gpus 3", "at most --gpus 1")








def test_bad_set_key(ftlaunch, tmp_path):
    out = tmp_path / "run"
    result = ftlaunch("--model", "tiny", "--dry-run", "--output-dir", out,
                      "--set", "learning_rat=1")
    assert_user_error(result, "learning_rat")
    assert not out.exists()










# --- plan ---------------------------------------------------------------------------------

def test_plan_that_does_not_fit_exits_2_with_json(ftlaunch):
    result = ftlaunch("plan", "--model", "llama-3.1-70b", "--hardware", "1xRTX4090-24GB",
                      "--method", "lora", "--json")
    assert result.returncode == USER_ERROR, result.stderr
    assert "Traceback" not in result.stderr
    plan = json.loads(result.stdout)
    assert plan["fits"] is False
    assert plan["reasons"]
    assert plan["model"]["id"] == "llama-3.1-70b"
    assert plan["method"] == "lora"
    assert "does not fit" in result.stderr


def test_plan_that_fits_exits_0(ftlaunch):
    result = ftlaunch("plan", "--model", "llama-3.1-8b", "--hardware", "8xH100-80GB", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["fits"] is True
    assert plan["num_processes"] == 8
    assert plan["hardware"]["gpu_name"] == "H100"


def test_plan_text(ftlaunch):
    result = ftlaunch("plan", "--model", "tiny", "--hardware", "2x8xA100-80GB")
    assert result.returncode == 0, result.stderr
    assert "tiny" in result.stdout
    assert "16 process(es) on 2 machine(s)" in result.stdout


# --- help and the informational commands ---------------------------------------------------

def test_top_level_help(ftlaunch):
    result = ftlaunch("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: ftlaunch [OPTIONS] COMMAND")
    assert re.search(r"^\s+--version\s", result.stdout, re.MULTILINE), result.stdout
    # the first word of each line in the Commands: section, not any mention in the prose
    listing = result.stdout.split("\nCommands:\n", 1)[1]
    commands = {line.split()[0] for line in listing.splitlines() if line.strip()}
    assert commands >= {"train", "plan", "hardware", "recipes", "merge", "data", "generate"}, \
        commands


@pytest.mark.parametrize("args, needles", [
    (["train"], ["--model", "--gpus", "--data", "--recipe", "--output-dir", "--method",
                 "--engine", "--max-steps", "--seq-len", "--global-batch-size", "--set",
                 "--nnodes", "--node-rank", "--master-addr", "--master-port", "--dry-run",
                 "--fresh", "--eval-split", "--eval-data", "--packing", "--no-packing",
                 "--system-prompt", "--trust-remote-code"]),
    (["plan"], ["--model", "--hardware", "--json", "--gpus", "--method", "--set"]),
    (["hardware"], ["--json"]),
    (["recipes"], ["List the bundled training recipes and model presets."]),
])
def test_help(ftlaunch, args, needles):
    result = ftlaunch(*args, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: ftlaunch {args[0]} ")
    for needle in needles:
        # a flag counts only as a whole word: --data must not be found inside --eval-data
        assert re.search(rf"(?<![\w-]){re.escape(needle)}(?![\w-])", result.stdout), needle


def test_version(ftlaunch):
    from ftlaunch import __version__

    result = ftlaunch("--version")
    assert result.returncode == 0
    assert __version__ in result.stdout


def test_hardware_json(ftlaunch):
    result = ftlaunch("hardware", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["cpu_cores"] >= 1
    assert data["ram_bytes"] > 0
    assert data["nodes"] == 1
    assert isinstance(data["gpus_per_node"], int)
    assert data["source"] == "detected"


def test_hardware_text(ftlaunch):
    result = ftlaunch("hardware")
    assert result.returncode == 0, result.stderr
    assert "cpu cores" in result.stdout


def test_recipes_lists_recipes_and_presets(ftlaunch):
    result = ftlaunch("recipes")
    assert result.returncode == 0, result.stderr
    names = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")}
    assert {"default", "demo", "tiny", "llama-3.1-8b"} <= names
    assert "meta-llama/Llama-3.1-8B-Instruct" in result.stdout


# --- the bare form: a dry run ---------------------------------------------------------------

def test_bare_form_dry_run(ftlaunch, tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    run_dir = tmp_path / "DIR"
    result = ftlaunch("--model", "tiny", "--gpus", "auto", "--dry-run", "--output-dir", run_dir)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "accelerate.commands.launch" in result.stdout
    assert "ftlaunch.worker.main" in result.stdout
    assert str((run_dir / "accelerate.yaml").resolve()) in result.stdout

    assert (run_dir / "accelerate.yaml").is_file()
    assert (run_dir / "run.yaml").is_file()
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "adapter").exists()
    assert not (tmp_path / "runs").exists()

    record = yaml.safe_load((run_dir / "run.yaml").read_text(encoding="utf-8"))
    assert record["plan"]["fits"] is True
    assert record["plan"]["model"]["id"] == "tiny"
    config = load_config_from_file(str(run_dir / "accelerate.yaml"))
    assert config.num_processes == record["plan"]["num_processes"]
    assert config.num_machines == 1

    # The same dry run again leaves the run as it is.
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    again = ftlaunch("--model", "tiny", "--gpus", "auto", "--dry-run", "--output-dir", run_dir)
    assert again.returncode == 0, again.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before

    # The dry run tokenized nothing: the worker started by hand on its files says so.
    worker = subprocess.run([sys.executable, "-m", "ftlaunch.worker.main", "--run-dir", str(run_dir)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "ACCELERATE_USE_CPU": "true"})
    assert worker.returncode == 2, worker.stdout + worker.stderr
    assert "without --dry-run" in worker.stderr
    assert "Traceback" not in worker.stderr


@pytest.mark.skipif(cores() < 2, reason="--gpus 2 on a CPU-only box needs two cores")
def test_dry_run_two_workers_writes_a_multi_process_config(ftlaunch, tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    run_dir = tmp_path / "two"
    result = ftlaunch("train", "--model", "tiny", "--gpus", "2", "--dry-run",
                      "--output-dir", run_dir)
    assert result.returncode == 0, result.stderr
    config = load_config_from_file(str(run_dir / "accelerate.yaml"))
    assert config.num_processes == 2
    assert config.main_process_port
    assert f"--main_process_port {config.main_process_port}" in result.stdout


def test_random_init_with_qlora_is_refused_before_launch(ftlaunch, tmp_path):
    run_dir = tmp_path / "run"
    result = ftlaunch("--model", "tiny", "--random-init", "--method", "qlora",
                      "--output-dir", run_dir)
    assert_user_error(result, "--random-init", "--method lora")
    assert not run_dir.exists()






def test_unknown_resume_setting(ftlaunch, tmp_path):
    assert_user_error(ftlaunch("--model", "tiny", "--set", "resume.allow_changed=lora,colour",
                               "--output-dir", tmp_path / "run"), "lora, colour", "seq_len")
    assert_user_error(ftlaunch("--model", "tiny", "--set", "resume.keep=3",
                               "--output-dir", tmp_path / "run"), "resume.allow_changed")




@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("1h30m", 5400),
                                           ("1.5h", 5400)])
def test_durations(text, seconds):
    assert parse_duration(text, "--grace") == seconds


@pytest.mark.parametrize("text", ["soon", "-5s", "0", "10x", "5m3"])
def test_bad_durations(text):
    with pytest.raises(UserError, match="--grace"):
        parse_duration(text, "--grace")
