"""Measured training rates: the benchmark table the launch's time estimate prefers.

Every launch that logged a few steps adds one line to `throughput.jsonl` in the
ftlaunch cache: the plan facts that decide the speed (model, hardware, method,
engine, processes, micro-batch, sequence length, checkpointing, precision,
packing) and the median input tokens/s over this launch's logged steps (the first
one, which carries the start-up, left out when there are enough). The next launch
with the same facts, a resume above all, is timed from that measurement instead of
an assumed utilisation, and says where the figure comes from.

A figure from another machine of the same description is only as good as that
machine; the line names the run it was measured in. No torch here.
"""

from __future__ import annotations

import datetime as _dt
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from ftlaunch.models.builtin import cache_dir
from ftlaunch.plan.planner import Plan
from ftlaunch.run.directory import metrics_rows

FILE = "throughput.jsonl"
# Logged steps a launch needs before its rate is kept: one alone is mostly start-up.
MIN_LOGS = 2


@dataclass(frozen=True)
class Measured:
    tokens_per_s: float
    logs: int  # logged steps the median is over
    run_dir: str
    date: str  # ISO date of the launch that measured it
    same_run: bool  # measured by an earlier launch of the run being started

    def source(self) -> str:
        where = ("this run's previous launch" if self.same_run
                 else f"an earlier run with the same plan, {self.run_dir}")
        return f"measured {self.tokens_per_s:,.0f} tok/s over {self.logs} logged steps of {where} ({self.date})"


def key(plan: Plan, packing: bool) -> dict:
    """What decides the speed of a step; the global batch (accumulation) does not."""
    hw = plan.hardware
    return {"model": plan.model_id, "parameters": plan.parameters,
            "trainable": plan.trainable_parameters, "nodes": hw.nodes,
            "gpus_per_node": hw.gpus_per_node, "gpu": hw.gpu.name if hw.has_gpus else None,
            "cpu_cores": None if hw.has_gpus else hw.cpu_cores, "method": plan.method,
            "engine": plan.engine, "zero_stage": plan.zero_stage, "offload": plan.offload,
            "processes": plan.num_processes, "micro_batch": plan.per_device_batch_size,
            "seq_len": plan.seq_len, "gradient_checkpointing": plan.gradient_checkpointing,
            "precision": plan.precision, "packing": packing,
            # DPO's steps do more per token (a reference pass); SFT's key is as it was.
            **({"objective": plan.objective, "reference_forward": plan.reference_forward}
               if plan.objective != "sft" else {})}


def history_path() -> Path:
    return cache_dir() / FILE


def rate_of_launch(metrics_jsonl: Path, since: float) -> tuple[float, int] | None:
    """(median tokens/s, logs) over the rows metrics.jsonl got from `since` on, or None
    with fewer than MIN_LOGS of them."""
    rates = [float(row["tokens_per_s"]) for row in metrics_rows(metrics_jsonl)
             if isinstance(row.get("tokens_per_s"), (int, float)) and row["tokens_per_s"] > 0
             and row.get("time", 0) >= since]
    if len(rates) < MIN_LOGS:
        return None
    if len(rates) > MIN_LOGS:
        rates = rates[1:]  # the first log's interval holds the first step's start-up
    return statistics.median(rates), len(rates)


def record(plan: Plan, packing: bool, run_dir: Path, metrics_jsonl: Path, since: float) -> None:
    """Keep the rate of the launch that started at `since`, if it logged enough steps."""
    found = rate_of_launch(metrics_jsonl, since)
    if found is None:
        return
    rate, logs = found
    date = _dt.date.fromtimestamp(since).isoformat()
    entry = {"key": key(plan, packing), "tokens_per_s": round(rate, 1), "logs": logs,
             "run_dir": str(run_dir), "date": date}
    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One short line in append mode: concurrent launches interleave whole lines.
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only home costs the next estimate, not this run


def lookup(plan: Plan, packing: bool, run_dir: Path) -> Measured | None:
    """The newest measurement of this plan: this run's own first, then any other run's."""
    wanted = key(plan, packing)
    own = other = None
    for entry in metrics_rows(history_path()):  # readable rows; a torn last line is skipped
        try:
            if entry["key"] != wanted or not entry["tokens_per_s"] > 0:
                continue
            found = Measured(float(entry["tokens_per_s"]), int(entry["logs"]),
                             str(entry["run_dir"]), str(entry["date"]),
                             same_run=entry["run_dir"] == str(run_dir))
        except (ValueError, KeyError, TypeError):
            continue
        if found.same_run:
            own = found
        else:
            other = found
    return own or other
