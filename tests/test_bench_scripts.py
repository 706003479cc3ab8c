"""bench/ scripts are not tests, but their dry runs must keep working on a CPU machine:
the GPU benchmark plans every row and prints commands the real CLI accepts."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from conftest import train_params

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_dry_run_plans_each_row_with_real_flags(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run",
                           "--hardware", "1xH100-80GB", "--models", "llama-3.1-8b",
                           "--work", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    commands = [line.split("would run: ftlaunch ", 1)[1] for line in proc.stdout.splitlines()
                if line.startswith("would run: ftlaunch ")]
    assert len(commands) == 3
    for command in commands:
        assert train_params(shlex.split(command))["model"] == "llama-3.1-8b"
    # The plain baseline gets the same micro-batch, accumulation, checkpointing and 4-bit
    # base as each plan, in flags its own parser accepts.
    import importlib.util

    spec = importlib.util.spec_from_file_location("plain_sft", ROOT / "bench" / "plain_sft.py")
    plain_sft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plain_sft)
    plain = [shlex.split(line.split("would run: ", 1)[1])[2:] for line in proc.stdout.splitlines()
             if line.startswith("would run: ") and "plain_sft.py" in line]
    assert len(plain) == 3
    parsed = [plain_sft.parse_args([*argv, "--out", str(tmp_path / "plain")]) for argv in plain]
    assert [(a.qlora, a.gradient_checkpointing, a.batch) for a in parsed][1:] == [
        (True, "off", 2), (True, "on", 2)]
    assert all(a.device == "cuda" and a.precision == "bf16" for a in parsed)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| llama-3.1-8b")]
    assert len(rows) == 3
    # The reference row is what the issue fixes: QLoRA, micro-batch 2, checkpointing on.
    assert "| 2, on |" in rows[2]


def test_cpu_benchmark_gives_the_plain_script_the_recipe_and_the_plan(tmp_path, monkeypatch):
    """bench/cpu_vs_trl.py's plain runs: flags plain_sft.py's own parser accepts, carrying
    the recipe's hyper-parameters and the plan's batch; the TRL-defaults run is the
    matched one without the four settings the plan decides."""
    import os

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import cpu_vs_trl
    import plain_sft

    from ftlaunch.plan import recipe as recipes

    rec = recipes.load_recipe("demo").to_json()
    the_plan = cpu_vs_trl.plan("tiny", "demo", 10, rec["seq_len"], rec["global_batch_size"],
                               dict(os.environ))
    argv = {v: cpu_vs_trl.plain_argv(v, "MODEL", rec, the_plan, 10, None, tmp_path / "out")
            for v in ("plain, TRL defaults", "plain, matched")}
    parsed = {v: plain_sft.parse_args(a[2:]) for v, a in argv.items()}
    matched = parsed["plain, matched"]
    assert matched.lr == rec["training"]["learning_rate"]
    assert matched.lora_r == rec["lora"]["r"] and matched.seq_len == the_plan["seq_len"]
    assert (matched.batch, matched.accumulation) == (the_plan["per_device_batch_size"],
                                                     the_plan["gradient_accumulation_steps"])
    assert matched.gradient_checkpointing == ("on" if the_plan["gradient_checkpointing"] else "off")
    assert argv["plain, matched"][:len(argv["plain, TRL defaults"])] == argv["plain, TRL defaults"]
    assert parsed["plain, TRL defaults"].gradient_checkpointing == "default"
