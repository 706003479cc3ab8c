"""loss.png from metrics.jsonl, drawn with matplotlib (Agg).

The top panel has the training loss and, when the run evaluated, the eval loss
(a marker per evaluation) against the step. A DPO or KTO run's rewards come next: the
margin between chosen (KTO: desirable) and rejected (undesirable) rewards (left axis)
and, for DPO, the reward accuracy, how often chosen outscores rejected (right axis, 0
to 1). The learning rate goes in the
last panel, with the same x axis, when the metrics logged one. The title names
the run (its model and strategy) when the caller knows them.

matplotlib is imported inside `figure`, so importing this module stays cheap:
the launcher reads the points (`read_points`) without it.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from ftlaunch.files import atomic_write
from ftlaunch.run.directory import metrics_rows

FIGSIZE = (8.0, 6.0)  # inches
DPI = 100  # so loss.png is 800 x 600 pixels
DEFAULT_TITLE = "Training loss"

TRAIN_LABEL = "training loss"
EVAL_LABEL = "eval loss"
LEARNING_RATE_LABEL = "learning rate"
MARGIN_LABEL = "reward margin (chosen - rejected)"
ACCURACY_LABEL = "reward accuracy"

Points = list[tuple[float, float]]
_METHODS = {"lora": "LoRA", "qlora": "QLoRA"}


@dataclass(frozen=True)
class Curves:
    """What loss.png draws, each a sorted list of (step, value)."""
    train: Points = field(default_factory=list)
    evals: Points = field(default_factory=list)
    learning_rates: Points = field(default_factory=list)
    reward_margins: Points = field(default_factory=list)  # DPO's, KTO's rewards/margins
    reward_accuracies: Points = field(default_factory=list)  # DPO's rewards/accuracies


def read_curves(metrics_jsonl: Path) -> Curves:
    """The training loss, eval loss and learning rate of metrics.jsonl. Unreadable or
    non-finite rows are skipped (a run killed mid-write can leave half a line), and a
    step logged twice keeps its last value."""
    series: dict[str, dict[float, float]] = {"loss": {}, "eval_loss": {}, "learning_rate": {},
                                             "rewards/margins": {}, "rewards/accuracies": {}}
    for row in metrics_rows(metrics_jsonl):
        if not _is_number(row.get("step")):
            continue
        for key, points in series.items():
            if _is_number(row.get(key)):
                points[float(row["step"])] = float(row[key])
    return Curves(*(sorted(series[key].items()) for key in series))


def read_points(metrics_jsonl: Path) -> tuple[Points, Points]:
    """(train, eval) as sorted (step, loss) lists, read as `read_curves` does."""
    curves = read_curves(metrics_jsonl)
    return curves.train, curves.evals


def run_title(model: str, strategy) -> str:
    """A title for loss.png: the model's name and how it trained (a run record's
    Strategy), e.g. "smollm2-135m: LoRA on ddp, 4 processes"."""
    method = _METHODS.get(strategy.method, strategy.method.upper())
    if getattr(strategy, "objective", "sft") != "sft":
        method = f"{strategy.objective.upper()}, {method}"
    text = f"{model}: {method} on {strategy.engine}"
    if strategy.zero_stage:
        text += f" (ZeRO-{strategy.zero_stage})"
    if strategy.offload:
        text += " with CPU offload"
    processes = strategy.world_size
    return text + f", {processes} process" + ("" if processes == 1 else "es")


def figure(curves: Curves, title: str | None = None):
    """The matplotlib Figure of loss.png (Agg canvas, not pyplot's: no global state).

    Its first axes hold the losses (labelled lines, a legend, the title); the next ones,
    sharing the x axis, hold DPO's rewards and the learning rate when `curves` has them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    rewards = bool(curves.reward_margins or curves.reward_accuracies)
    heights = (3, *((2,) if rewards else ()), *((1,) if curves.learning_rates else ()))
    axes = list(fig.subplots(len(heights), 1, sharex=True, height_ratios=heights, squeeze=False)[:, 0])
    loss_ax = axes.pop(0)
    reward_ax = axes.pop(0) if rewards else None
    rate_ax = axes.pop(0) if curves.learning_rates else None

    if curves.train:
        steps, values = zip(*curves.train)
        loss_ax.plot(steps, values, color="tab:blue", linewidth=1.5, label=TRAIN_LABEL,
                     marker="o" if len(curves.train) == 1 else None)
    if curves.evals:
        steps, values = zip(*curves.evals)
        loss_ax.plot(steps, values, color="tab:orange", linewidth=1.5, marker="o", markersize=4,
                     label=EVAL_LABEL)
    loss_ax.set_ylabel("loss")
    loss_ax.set_title(title or DEFAULT_TITLE)
    loss_ax.grid(True, alpha=0.3)
    if curves.train or curves.evals:
        loss_ax.legend(loc="upper right")

    bottom = loss_ax
    if reward_ax is not None:
        _draw_rewards(reward_ax, curves)
        bottom = reward_ax
    if rate_ax is not None:
        steps, values = zip(*curves.learning_rates)
        rate_ax.plot(steps, values, color="tab:green", linewidth=1.5, label=LEARNING_RATE_LABEL)
        rate_ax.set_ylabel(LEARNING_RATE_LABEL)
        rate_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        rate_ax.grid(True, alpha=0.3)
        bottom = rate_ax
    bottom.set_xlabel("step")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def _draw_rewards(ax, curves: Curves) -> None:
    lines = []
    if curves.reward_margins:
        steps, values = zip(*curves.reward_margins)
        lines += ax.plot(steps, values, color="tab:purple", linewidth=1.5, label=MARGIN_LABEL)
        ax.axhline(0.0, color="gray", linewidth=0.8, alpha=0.6)
    ax.set_ylabel("reward margin")
    ax.grid(True, alpha=0.3)
    if curves.reward_accuracies:
        twin = ax.twinx()
        steps, values = zip(*curves.reward_accuracies)
        lines += twin.plot(steps, values, color="tab:red", linewidth=1.2, linestyle="--",
                           label=ACCURACY_LABEL)
        twin.set_ylim(-0.05, 1.05)
        twin.set_ylabel("accuracy")
    ax.legend(lines, [line.get_label() for line in lines], loc="upper left")


def write_loss_png(metrics_jsonl: Path, out_png: Path, *, title: str | None = None) -> Path | None:
    """Draw metrics.jsonl's curves into out_png (written atomically), titled `title` (e.g.
    `run_title(model name, strategy)`; a generic title when None).

    Returns out_png, or None, writing nothing, when fewer than 2 training-loss points
    were logged (a single point is no curve)."""
    curves = read_curves(metrics_jsonl)
    if len(curves.train) < 2:
        return None
    buffer = io.BytesIO()
    figure(curves, title).savefig(buffer, format="png", dpi=DPI)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out_png, buffer.getvalue())


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
