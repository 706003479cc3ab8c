"""What a user reads: the plan table before launch, the progress line on rank 0 and the
final summary, checked on the captured output of a real tiny training (tiny_run), plus
the pure pieces behind them (bars, estimates, the progress line)."""

from __future__ import annotations

import json
import re
import shlex
import statistics
import time
from pathlib import Path

import pytest

from conftest import parse_ftlaunch, run_ftlaunch
from ftlaunch import units
from ftlaunch.plan import estimate
from ftlaunch.models import presets as models
from ftlaunch.run import rank_logs
from ftlaunch.show import report
from ftlaunch.detect.hardware import _KNOWN_GPUS, known_gpu, parse_spec
from ftlaunch.plan.planner import TrainSpec, plan
from ftlaunch.show.progress import PROGRESS_BAR_WIDTH, progress_line

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
    # No GPU: no estimate promised, unless an earlier tiny run of this session with the
    # same plan left its measured rate (test_a_second_run_is_timed_by_the_first).
    assert re.search(r"^time       (measured once training runs|~.+ \(measured [\d,]+ tok/s over "
                     r"\d+ logged steps of an earlier run with the same plan, )", table, re.M), table


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


# --- the time estimate from measured rates (ftlaunch.launch.throughput) -----------------------------

def _metrics(path: Path, rows: list[tuple[float, float | None]]) -> Path:
    """metrics.jsonl with one logged step per (time, tokens_per_s) and an eval row between."""
    lines = []
    for step, (when, rate) in enumerate(rows, start=1):
        row = {"step": step, "time": when, "loss": 2.0}
        if rate is not None:
            row["tokens_per_s"] = rate
        lines.append(json.dumps(row))
    lines.insert(2, json.dumps({"step": 2, "time": rows[1][0], "eval_loss": 1.0}))
    path.write_text("\n".join(lines) + "\n{\"step\": 9, \"tim", encoding="utf-8")  # a torn line
    return path


def _tiny_plan(seq_len: int = 128):
    return plan(parse_spec("cpu"), models.resolve("tiny"), TrainSpec(seq_len=seq_len, global_batch_size=4))


def test_a_launch_rate_is_the_median_after_its_first_log(tmp_path):
    from ftlaunch.launch import throughput

    metrics = _metrics(tmp_path / "metrics.jsonl",
                       [(100.0, 50.0), (110.0, 900.0), (120.0, 1000.0), (130.0, 1100.0),
                        (140.0, None), (150.0, 5000.0)])
    # The first log (start-up) is left out: median of 900, 1000, 1100, 5000.
    assert throughput.rate_of_launch(metrics, since=0) == (1050.0, 4)
    # An earlier launch's rows do not count; two logs are enough, and both count.
    assert throughput.rate_of_launch(metrics, since=125.0) == (3050.0, 2)
    assert throughput.rate_of_launch(metrics, since=145.0) is None  # one log is start-up
    assert throughput.rate_of_launch(tmp_path / "missing.jsonl", since=0) is None


def test_measured_rates_are_kept_per_plan_and_the_run_own_first(tmp_path, monkeypatch):
    from ftlaunch.launch import throughput

    monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path / "cache"))
    p = _tiny_plan()
    assert throughput.lookup(p, True, tmp_path / "a") is None  # nothing measured yet
    fast = _metrics(tmp_path / "fast.jsonl", [(10.0, 1.0), (20.0, 2000.0), (30.0, 2000.0)])
    slow = _metrics(tmp_path / "slow.jsonl", [(10.0, 1.0), (20.0, 500.0), (30.0, 500.0)])
    throughput.record(p, True, tmp_path / "a", slow, since=0)
    kept = throughput.lookup(p, True, tmp_path / "a")
    assert (kept.tokens_per_s, kept.logs) == (500.0, 2)
    throughput.record(p, True, tmp_path / "b", fast, since=0)
    # A torn or foreign line in the table is skipped.
    with open(throughput.history_path(), "a", encoding="utf-8") as f:
        f.write('{"key": 1}\n{"tokens_per_s\n')
    own = throughput.lookup(p, True, tmp_path / "a")
    assert own.same_run and own.tokens_per_s == 500.0, "the run's own rate before a newer other one"
    other = throughput.lookup(p, True, tmp_path / "c")
    assert not other.same_run and other.run_dir == str(tmp_path / "b"), "the newest other run"
    assert throughput.lookup(p, False, tmp_path / "a") is None, "packing is part of the plan"
    assert throughput.lookup(_tiny_plan(seq_len=64), True, tmp_path / "a") is None


def test_the_time_line_from_a_measured_rate():
    from ftlaunch.launch.throughput import Measured

    p = _tiny_plan()
    size = estimate.run_size(p, max_steps=100, epochs=None)  # 100 steps x 512 tokens
    own = Measured(256.0, 5, "/runs/x", "2026-12-04", same_run=True)
    lines = report.run_text(p, models.resolve("tiny"), size, measured=own, done_steps=40)
    # 60 steps x 512 tokens / 256 tok/s = 120 s
    assert lines[-1] == ("time       ~2 min 00 s for the 60 steps left (measured 256 tok/s over 5 "
                         "logged steps of this run's previous launch (2026-12-04))")
    other = Measured(1024.0, 3, "/runs/y", "2026-12-01", same_run=False)
    assert report.run_text(p, models.resolve("tiny"), size, measured=other)[-1] == (
        "time       ~50 s (measured 1,024 tok/s over 3 logged steps of an earlier run with the "
        "same plan, /runs/y (2026-12-01))")


def test_a_second_run_is_timed_by_the_first(tmp_path):
    """Two real tiny trainings with the same plan in a cache of their own: the first has no
    figure to go by; it keeps its measured rate, and the second's table is timed by it."""
    from ftlaunch.launch import throughput

    env = {"FTLAUNCH_CACHE": str(tmp_path / "cache")}
    args = ["--model", "tiny", "--gpus", "1", "--global-batch-size", "2", "--seq-len", "64",
            "--set", "logging_steps=1", "--set", "save_steps=50"]
    first = run_ftlaunch(*args, "--max-steps", "5", "--output-dir", str(tmp_path / "first"), env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "time       measured once training runs" in first.stdout
    [entry] = [json.loads(line) for line in
               (tmp_path / "cache" / throughput.FILE).read_text().splitlines()]
    rates = [row["tokens_per_s"] for row in map(json.loads, (tmp_path / "first" / "metrics.jsonl")
                                                .read_text().splitlines()) if "tokens_per_s" in row]
    assert len(rates) == 5 and entry["logs"] == 4
    # The first log is the start-up's: the median of the other four.
    assert entry["tokens_per_s"] == pytest.approx(statistics.median(rates[1:]), abs=0.1)
    assert entry["run_dir"] == str(tmp_path / "first")

    second = run_ftlaunch(*args, "--max-steps", "8", "--output-dir", str(tmp_path / "second"),
                          env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    line = next(l for l in second.stdout.splitlines() if l.startswith("time "))
    seconds = 8 * 2 * 64 / entry["tokens_per_s"]  # 8 steps of 2 packed rows of 64 tokens
    assert line == (f"time       ~{units.duration(seconds)} (measured "
                    f"{entry['tokens_per_s']:,.0f} tok/s over 4 logged steps of an earlier run "
                    f"with the same plan, {tmp_path / 'first'} ({entry['date']}))")
