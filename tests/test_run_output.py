"""What a user reads: the plan table before launch, the progress line on rank 0 and the
final summary, checked on the captured output of a real tiny training (tiny_run), plus
the pure pieces behind them (bars, estimates, the progress line)."""

from __future__ import annotations

import json
import re
import subprocess

from conftest import FTLAUNCH
from ftlaunch import estimate, models, rank_logs, report
from ftlaunch.hardware import parse_spec
from ftlaunch.planner import TrainSpec, plan
from ftlaunch.train import PROGRESS_BAR_WIDTH, progress_line

PROGRESS = re.compile(r"^\[(#*)(-*)\] step (\d+)/12 +(\d+)% \| loss (\d+\.\d{4}) \| lr \S+ \| "
                      r"(\S+) tok/s \| elapsed .+ \| ETA .+$")


def test_the_plan_table_comes_before_the_launch(tiny_run):
    out = tiny_run[0].stdout
    table = out[:out.index("Launching")]
    assert "strategy   LORA on cpu, 1 process(es) on 1 machine(s), fp32" in table
    assert re.search(r"^  cpu worker 0 +\[[WAXO.]{%d}\] +\d+\.\d\d / \d+\.\d\d GiB$"
                     % report.BAR_WIDTH, table, re.M), table
    # TINY_TRAIN: 12 steps of a global batch of 4 packed rows of 128 tokens.
    assert "run        12 steps x 512 tokens = 6.1k tokens (data: " in table
    assert "time       measured once training runs" in table  # no GPU: no estimate promised


def test_the_progress_line_on_rank_0(tiny_run):
    out, run_dir = tiny_run[0].stdout, tiny_run[1]
    lines = [m for m in map(PROGRESS.match, out.splitlines()) if m]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert [int(m[3]) for m in lines] == [row["step"] for row in logged] == [2, 4, 6, 8, 10, 12]
    for match, row in zip(lines, logged):
        step = int(match[3])
        assert len(match[1]) == round(step / 12 * PROGRESS_BAR_WIDTH)
        assert len(match[1]) + len(match[2]) == PROGRESS_BAR_WIDTH
        assert int(match[4]) == round(step / 12 * 100)
        assert float(match[5]) == round(row["loss"], 4)
    assert lines[-1][0].endswith("ETA 0 s")


def test_the_final_summary_says_where_everything_is_and_what_next(tiny_run):
    out, run_dir = tiny_run[0].stdout, tiny_run[1]
    summary = out[out.index("Done."):]
    assert f"Run directory: {run_dir}" in summary
    for name in ("adapter/", "loss.png", "metrics.jsonl", "train.log"):
        assert f"  {name}" in summary and (run_dir / name.rstrip("/")).exists()
    assert f"ftlaunch generate {run_dir} --prompt" in summary
    assert f"ftlaunch merge {run_dir}" in summary


def test_progress_line_arithmetic():
    line = progress_line(30, 120, 1.23456, 2e-4, 12345.0, elapsed_s=60.0, steps_done=20)
    # 20 steps in 60 s this launch; 90 to go: 4 min 30 s.
    assert line == ("[#####---------------] step 30/120  25% | loss 1.2346 | lr 2.00e-04 | "
                    "12.3k tok/s | elapsed 1 min 00 s | ETA 4 min 30 s")


def test_memory_bars_split_the_budget_by_term():
    p = plan(parse_spec("2xRTX4090-24GB"), models.resolve("llama-3.1-8b"),
             TrainSpec(seq_len=2048, global_batch_size=16))
    bars = report.memory_bars(p)
    rows = [row for row in bars if row.lstrip().startswith("gpu")]
    assert [row.split()[1] for row in rows] == ["0", "1"]  # a bar per device
    bar = re.search(r"\[(.*)\]", rows[0])[1]
    assert len(bar) == report.BAR_WIDTH
    scale = max(p.budget_bytes, p.memory.total) / report.BAR_WIDTH
    assert abs(bar.count("W") - p.memory.weights / scale) <= 1
    assert abs(bar.count(".") - (p.budget_bytes - p.memory.total) / scale) <= 2


def test_plan_command_shows_the_bars():
    out = subprocess.run([FTLAUNCH, "plan", "--model", "llama-3.1-70b", "--hardware",
                          "1xRTX4090-24GB", "--method", "lora"], capture_output=True, text=True)
    assert out.returncode == 2
    assert re.search(r"gpu 0 +\[[WAXO]*![WAXO]*\] +136\.\d\d / 22\.08 GiB", out.stdout), out.stdout


def test_run_size_and_gpu_time():
    spec = models.resolve("llama-3.1-8b")
    p = plan(parse_spec("1xH100-80GB"), spec, TrainSpec(seq_len=2048, global_batch_size=16))
    size = estimate.run_size(p, max_steps=100, epochs=None)
    assert (size.steps, size.tokens_per_step, size.tokens) == (100, 16 * 2048, 100 * 16 * 2048)
    by_epochs = estimate.run_size(p, None, 2.0, data_tokens=2048 * 160, examples=1000)
    assert by_epochs.steps == 20  # 160 packed rows, twice, 16 rows a step
    seconds = estimate.gpu_seconds(spec, p, size.tokens)
    per_token = (4 + 2 * p.gradient_checkpointing) * spec.parameters \
        + 6 * spec.num_layers * 2048 * spec.num_heads * spec.head_dim
    assert seconds == size.tokens * per_token / (989e12 * estimate.MFU[p.method])
    cpu = plan(parse_spec("cpu"), spec, TrainSpec(seq_len=2048, global_batch_size=16))
    assert estimate.gpu_seconds(spec, cpu, size.tokens) is None


def test_the_first_error_of_the_ranks(tmp_path, monkeypatch):
    """Real exceptions recorded by two ranks: the earlier is named first, with its log."""
    for rank, exc in ((1, RuntimeError("CUDA out of memory on device 1")),
                      (0, ConnectionResetError("peer 1 closed the connection"))):
        monkeypatch.setenv("RANK", str(rank))
        try:
            raise exc
        except Exception as caught:  # noqa: BLE001 - what a dying rank records
            rank_logs.record_error(tmp_path, caught)
        (tmp_path / "ranks" / f"rank-{rank}.log").touch()
    text = rank_logs.first_error_text(tmp_path, tmp_path / "train.log")
    assert text.startswith("First error: rank 1 failed with RuntimeError: CUDA out of memory "
                           "on device 1 (")
    assert "test_run_output.py, line" in text and str(tmp_path / "ranks" / "rank-1.log") in text
    assert "Rank(s) 0 failed after it" in text
    rank_logs.clear(tmp_path, [0, 1])
    assert rank_logs.first_error_text(tmp_path, tmp_path / "train.log") is None
