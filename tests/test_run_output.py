"""What a user reads: the plan table before launch, the progress line on rank 0 and the
final summary, checked on the captured output of a real tiny training (tiny_run), plus
the pure pieces behind them (bars, estimates, the progress line)."""

from __future__ import annotations

import json
import re

import shlex
import time
from pathlib import Path

import pytest

from conftest import parse_ftlaunch, run_ftlaunch
from ftlaunch import estimate, models, rank_logs, report
from ftlaunch.hardware import _KNOWN_GPUS, known_gpu, parse_spec
from ftlaunch.planner import TrainSpec, plan
from ftlaunch.report import PROGRESS_BAR_WIDTH, progress_line

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
        assert len(match[1]) + len(match[2]) == PROGRESS_BAR_WIDTH
        assert float(match[5]) == round(row["loss"], 4)
        assert float(match[6].rstrip("k")) > 0, "a measured rate"
    filled = [len(m[1]) for m in lines]
    assert filled == sorted(filled) and filled[-1] == PROGRESS_BAR_WIDTH  # fills up to the end
    assert lines[-1][4] == "100" and lines[-1][0].endswith("ETA 0 s")


def test_the_final_summary_says_where_everything_is_and_what_next(tiny_run):
    out, run_dir = tiny_run[0].stdout, tiny_run[1]
    summary = out[out.index("Done."):]
    assert f"Run directory: {run_dir}" in summary
    for name in ("adapter/", "loss.png", "metrics.jsonl", "train.log"):
        assert f"  {name}" in summary and (run_dir / name.rstrip("/")).exists()
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert (f"Done. Loss {losses[0]:.4f} at the first log, {losses[-1]:.4f} at the last "
            f"({len(losses)} logs).") in summary
    # The next commands are real ftlaunch commands, as its own parser reads them.
    commands = [shlex.split(line.split("   ")[0]) for line in summary.splitlines()
                if line.startswith("  ftlaunch ")]
    assert [parse_ftlaunch(argv[1:])[0] for argv in commands] == ["generate", "merge"]
    assert all(Path(parse_ftlaunch(argv[1:])[1]["run_dir"]) == run_dir for argv in commands)


def test_progress_line_arithmetic():
    line = progress_line(30, 120, 1.23456, 2e-4, 12345.0, elapsed_s=60.0, steps_done=20)
    # 20 steps in 60 s this launch; 90 to go: 4 min 30 s.
    assert line == ("[#####---------------] step 30/120  25% | loss 1.2346 | lr 2.00e-04 | "
                    "12.3k tok/s | elapsed 1 min 00 s | ETA 4 min 30 s")


def _bars(hardware: str, model: str, **spec) -> list[str]:
    p = plan(parse_spec(hardware), models.resolve(model),
             TrainSpec(seq_len=2048, global_batch_size=16, **spec))
    return [re.search(r"\[(.*)\]", row)[1] for row in report.memory_bars(p)
            if row.lstrip().startswith("gpu")]


def test_memory_bars_split_the_budget_by_term():
    bars = _bars("2xRTX4090-24GB", "llama-3.1-8b")
    assert len(bars) == 2 and bars[0] == bars[1]  # a bar per device, the same load
    # Terms in order, then the free part: DDP LoRA of an 8B model keeps its 16-bit weights
    # (15 GiB) on each 24 GB card, by far the biggest term, and fits with room to spare.
    assert re.fullmatch(r"W+A*X+O*\.+", bars[0]) and len(bars[0]) == report.BAR_WIDTH
    assert bars[0].count("W") > 2 * bars[0].count("X")


def test_a_plan_over_budget_marks_where_the_budget_ends():
    [bar] = _bars("1xRTX4090-24GB", "llama-3.1-70b", method="lora")
    assert len(bar) == report.BAR_WIDTH and "." not in bar
    # 70B in 16 bits needs ~137 GiB against a 22 GiB budget: the mark at about a sixth.
    assert 5 <= bar.index("!") <= 8 and set(bar) - {"!"} <= set("WAXO")


def test_plan_command_shows_the_bars():
    out = run_ftlaunch("plan", "--model", "llama-3.1-70b", "--hardware", "1xRTX4090-24GB",
                       "--method", "lora")
    assert out.returncode == 2
    assert re.search(r"gpu 0 +\[[WAXO]*![WAXO]*\] +\d+\.\d\d / 22\.08 GiB", out.stdout), out.stdout


def test_run_size_and_gpu_time():
    spec = models.resolve("llama-3.1-8b")
    p = plan(parse_spec("1xH100-80GB"), spec, TrainSpec(seq_len=2048, global_batch_size=16))
    size = estimate.run_size(p, max_steps=100, epochs=None)
    assert (size.steps, size.tokens_per_step, size.tokens) == (100, 16 * 2048, 100 * 16 * 2048)
    by_epochs = estimate.run_size(p, None, 2.0, data_tokens=2048 * 160, examples=1000)
    assert by_epochs.steps == 20  # 160 packed rows, twice, 16 rows a step
    # The recipes' max_steps -1 means "by the epochs", as None does; one epoch of 5000
    # tokens is 5000 tokens, not a full step's 32768.
    assert estimate.run_size(p, -1, 1.0, data_tokens=5000, examples=10).tokens == 5000
    # By hand: 8,030,261,248 parameters x 4 (forward, backward to the activations) plus
    # attention 6 x 32 layers x 2048 x 32 heads x 128 = 33,731,657,728 FLOP per token;
    # x 3,276,800 tokens / (989 TFLOP/s x 0.35) = 319.3 s. With gradient checkpointing
    # (x 6 instead of x 4): 49,792,180,224 FLOP per token, 471.4 s.
    assert not p.gradient_checkpointing
    assert estimate.gpu_seconds(spec, p, size.tokens) == pytest.approx(319.32, abs=0.01)
    checkpointed = plan(parse_spec("1xH100-80GB"), spec,
                        TrainSpec(seq_len=2048, global_batch_size=16, gradient_checkpointing=True))
    assert estimate.gpu_seconds(spec, checkpointed, size.tokens) == pytest.approx(471.35, abs=0.01)
    assert "time       ~5 min 19 s (estimate" in "\n".join(report.run_text(p, spec, size))
    cpu = plan(parse_spec("cpu"), spec, TrainSpec(seq_len=2048, global_batch_size=16))
    assert estimate.gpu_seconds(spec, cpu, size.tokens) is None


@pytest.mark.parametrize("name, known", [
    ("H100", "H100"), ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA GeForce RTX 4090", "RTX4090"),
    ("NVIDIA RTX A6000", "RTXA6000"), ("NVIDIA RTX 6000 Ada Generation", "RTX6000ADA"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("Tesla T4", "T4"),
    ("NVIDIA RTX A1000", None), ("NVIDIA T400", None)])  # not an A100, not a T4
def test_gpu_names_are_matched_by_whole_words(name, known):
    assert known_gpu(name) == known


def test_every_known_gpu_has_a_peak():
    assert set(estimate.PEAK_TFLOPS) == set(_KNOWN_GPUS)


def test_the_first_error_of_the_ranks(tmp_path, monkeypatch):
    """Real exceptions recorded by two ranks: the earlier is named first, with its log."""
    for rank, exc in ((1, RuntimeError("CUDA out of memory on device 1")),
                      (0, ConnectionResetError("peer 1 closed the connection"))):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))  # one node: rank 0 logs to the launcher's log
        try:
            raise exc
        except Exception as caught:  # noqa: BLE001 - what a dying rank records
            rank_logs.record_error(tmp_path, caught, tmp_path / "train.log")
    launched = 0.0
    text = rank_logs.first_error_text(tmp_path, tmp_path / "train.log", launched)
    assert text.startswith("First error: rank 1 failed with RuntimeError: CUDA out of memory "
                           "on device 1 (")
    assert "test_run_output.py, line" in text and str(tmp_path / "ranks" / "rank-1.log") in text
    assert "Rank(s) 0 failed after it" in text
    assert rank_logs.errors(tmp_path)[1]["log"] == str(tmp_path / "train.log")  # rank 0's
    # A later launch does not count these: they were written before it started.
    assert rank_logs.first_error_text(tmp_path, tmp_path / "train.log", time.time() + 1) is None
