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
