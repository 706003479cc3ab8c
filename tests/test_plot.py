"""loss.png: drawn with matplotlib from metrics.jsonl; checked as a PNG and through its figure."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ftlaunch.show import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(path: Path, train: list[tuple[int, float]], evals=(), learning_rate=True) -> Path:
    rows = [{"step": s, "loss": v, **({"learning_rate": 1e-4 * (1 - s / 100)} if learning_rate else {})}
            for s, v in train]
    rows += [{"step": s, "eval_loss": v, "eval_perplexity": math.exp(v)} for s, v in evals]
    path.write_text("".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["step"])))
    return path


def falling(steps) -> list[tuple[int, float]]:
    return [(s, 3.0 * math.exp(-s / 15) + 0.5) for s in steps]


def labelled_lines(ax) -> dict[str, object]:
    return {line.get_label(): line for line in ax.get_lines()}


def test_a_png_of_the_expected_size_is_written_atomically(tmp_path):
    from matplotlib.image import imread

    train = falling(range(2, 61, 2))
    evals = [(s, dict(train)[s] + 0.2) for s in (20, 40, 60)]
    png = plot.write_loss_png(write_metrics(tmp_path / "metrics.jsonl", train, evals),
                              tmp_path / "loss.png", title="tiny: LoRA on cpu, 1 process")
    assert png == tmp_path / "loss.png"
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    pixels = imread(png)
    assert pixels.shape[:2] == (round(plot.FIGSIZE[1] * plot.DPI), round(plot.FIGSIZE[0] * plot.DPI))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_the_figure_has_losses_eval_and_learning_rate_panels():
    train = falling(range(1, 31))
    curves = plot.Curves(train=train, evals=[(10, 1.9), (20, 1.2), (30, 1.0)],
                         learning_rates=[(s, 2e-4 * (1 - s / 31)) for s, _ in train])
    fig = plot.figure(curves, "smollm2-135m: LoRA on ddp, 2 processes")
    loss_ax, rate_ax = fig.axes  # two panels, the learning rate below
    assert loss_ax.get_title() == "smollm2-135m: LoRA on ddp, 2 processes"
    assert rate_ax.get_shared_x_axes().joined(loss_ax, rate_ax)
    assert loss_ax.get_position().y0 > rate_ax.get_position().y0

    lines = labelled_lines(loss_ax)
    assert set(lines) == {plot.TRAIN_LABEL, plot.EVAL_LABEL}
    assert list(lines[plot.TRAIN_LABEL].get_xdata()) == [s for s, _ in train]
    assert list(lines[plot.TRAIN_LABEL].get_ydata()) == [v for _, v in train]
    assert list(lines[plot.EVAL_LABEL].get_ydata()) == [1.9, 1.2, 1.0]
    legend = loss_ax.get_legend()
    assert legend is not None
    assert {t.get_text() for t in legend.get_texts()} == {plot.TRAIN_LABEL, plot.EVAL_LABEL}
    assert loss_ax.get_ylabel() == "loss"

    assert list(labelled_lines(rate_ax)) == [plot.LEARNING_RATE_LABEL]
    assert rate_ax.get_ylabel() == plot.LEARNING_RATE_LABEL
    assert rate_ax.get_xlabel() == "step"


def test_without_eval_or_learning_rate_there_is_one_panel_and_one_line():
    fig = plot.figure(plot.Curves(train=[(1, 2.0), (2, 1.5), (3, 1.4)]))
    (ax,) = fig.axes
    assert list(labelled_lines(ax)) == [plot.TRAIN_LABEL]
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss"
    assert ax.get_title() == plot.DEFAULT_TITLE  # no run named


def test_the_curves_read_from_metrics(tmp_path):
    metrics = write_metrics(tmp_path / "m.jsonl", [(1, 2.0), (2, 1.5)], evals=[(2, 1.7)])
    curves = plot.read_curves(metrics)
    assert curves.train == [(1.0, 2.0), (2.0, 1.5)]
    assert curves.evals == [(2.0, 1.7)]
    assert [s for s, _ in curves.learning_rates] == [1.0, 2.0]
    assert [v for _, v in curves.learning_rates] == pytest.approx([0.99e-4, 0.98e-4])
    assert plot.read_points(metrics) == (curves.train, curves.evals)
    without = write_metrics(tmp_path / "n.jsonl", [(1, 2.0), (2, 1.5)], learning_rate=False)
    assert plot.read_curves(without).learning_rates == []


@pytest.mark.parametrize("train", [[], [(5, 1.0)]])
def test_fewer_than_two_points_write_nothing(tmp_path, train):
    metrics = write_metrics(tmp_path / "m.jsonl", train, evals=[(5, 1.1), (10, 1.0)])
    assert plot.write_loss_png(metrics, tmp_path / "loss.png") is None
    assert plot.write_loss_png(tmp_path / "missing.jsonl", tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()


def test_bad_lines_are_skipped_and_a_flat_loss_still_draws(tmp_path):
    metrics = tmp_path / "m.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": NaN}\n'
                       '{"step": 3, "loss": 2.0}\n[1, 2]\n{"loss": 9.0}\n{"step": 4, "lo')
    out = tmp_path / "sub" / "loss.png"
    out.parent.mkdir()
    out.write_bytes(b"an older plot")
    assert plot.write_loss_png(metrics, out) == out  # replaced
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert plot.read_points(metrics) == ([(1.0, 2.0), (3.0, 2.0)], [])
    (ax,) = plot.figure(plot.read_curves(metrics)).axes
    low, high = ax.get_ylim()
    assert low < 2.0 < high  # a flat curve still gets a range


def test_run_title_names_the_model_and_strategy():
    from types import SimpleNamespace as Strategy

    zero3 = Strategy(method="qlora", engine="deepspeed", zero_stage=3, offload=True, world_size=8)
    assert (plot.run_title("smollm2-135m", zero3)
            == "smollm2-135m: QLoRA on deepspeed (ZeRO-3) with CPU offload, 8 processes")
    cpu = Strategy(method="lora", engine="cpu", zero_stage=None, offload=False, world_size=1)
    assert plot.run_title("tiny", cpu) == "tiny: LoRA on cpu, 1 process"


def test_importing_the_module_does_not_import_matplotlib():
    code = ("import sys, ftlaunch.show.plot; "
            "print(sorted(m for m in ('matplotlib', 'torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
