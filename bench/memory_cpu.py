"""Per-rank memory of DDP QLoRA, FSDP QLoRA and ZeRO-3 QLoRA on 2 CPU processes, measured
against the plan's per-device peak (a benchmark, not a test).

    python bench/memory_cpu.py [--model qwen2.5-0.5b] [--seq-len 256] [--steps 3] [--append]

The preset's architecture is built once with random weights into a local folder (QLoRA
quantizes saved weights, so --random-init cannot be used), the text data is long enough
that every packed row is full, and each strategy trains the same steps through the real
`ftlaunch` CLI. Measured per rank: the peak resident set while training (the worker
resets Linux's high-water mark when training begins, after the model is loaded and
wrapped), which is what the plan's per-device peak models; and the process's peak
including loading. Planned: `ftlaunch plan --json` with the same flags.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

from gpu import build_model_folder, write_data  # bench/, beside this script

ROOT = Path(__file__).resolve().parent.parent
FTLAUNCH = str(Path(sys.executable).parent / "ftlaunch")
BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"
STRATEGIES = (("DDP QLoRA", ()), ("FSDP QLoRA", ("--engine", "fsdp")),
              ("ZeRO-3 QLoRA", ("--engine", "deepspeed")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ftlaunch-bench-memory"))
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None,
                        help="MALLOC_MMAP_THRESHOLD_ for the workers: glibc then maps every "
                             "allocation above it on its own and gives it back when freed, so "
                             "the resident set follows live tensors (default: glibc's dynamic "
                             "threshold, which climbs to 32 MiB and leaves a fragmented heap)")
    parser.add_argument("--append", action="store_true", help="append to docs/BENCHMARKS.md")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folder = args.work / f"{args.model}-random"
    build_model_folder(args.model, folder)
    data = write_data(args.work / "data.jsonl", args.seq_len)
    rows = [measure(label, flags, folder, data, args) for label, flags in STRATEGIES]
    table = render(rows, args)
    print(table)
    if args.append:
        with open(BENCHMARKS, "a", encoding="utf-8") as out:
            out.write("\n" + table + "\n")
    return 0


def flags(strategy: tuple[str, ...], folder: Path, data: Path, args) -> list[str]:
    return ["--model", str(folder), "--gpus", "2", "--method", "qlora", *strategy,
            "--data", str(data), "--seq-len", str(args.seq_len), "--global-batch-size", "2",
            "--max-steps", str(args.steps), "--set", "logging_steps=1",
            "--set", f"save_steps={args.steps * 10}", "--set", "seed=0"]


def measure(label: str, strategy: tuple[str, ...], folder: Path, data: Path, args) -> dict:
    common = flags(strategy, folder, data, args)
    planned = json.loads(subprocess.run([FTLAUNCH, "plan", *common, "--json"], check=True,
                                        capture_output=True, text=True).stdout)
    run_dir = args.work / label.replace(" ", "-").lower()
    env = dict(os.environ)
    if args.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    subprocess.run([FTLAUNCH, *common, "--fresh", "--output-dir", str(run_dir)], check=True,
                   stdout=subprocess.DEVNULL, env=env)
    ranks = [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("rank-*.json"))]
    return {"label": label, "plan": planned, "command": [FTLAUNCH, *common],
            "training": [r["peak_memory"]["peak_memory_gib"] for r in ranks],
            "process": [r["peak_memory"]["process_peak_memory_gib"] for r in ranks],
            "at_start": [r["peak_memory"].get("resident_at_start_gib", 0.0) for r in ranks],
            "tokens_per_s": _tokens_per_s(run_dir),
            "frozen": [r["sharding"]["frozen_bytes"] / 2**30 for r in ranks]}


def _tokens_per_s(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return sum(speeds) / len(speeds) if speeds else 0.0


def render(rows: list[dict], args) -> str:
    import platform

    import torch
    import transformers

    date = dt.date.today().isoformat()
    allocator = (f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}"
                 if args.malloc_mmap_threshold is not None else "glibc's default allocator")
    lines = [f"## Per-rank memory on 2 CPU processes vs the plan, {allocator} ({date})", "",
             f"{args.model} with random weights, QLoRA (NF4, double quant), seq {args.seq_len}, "
             f"micro-batch 1 per rank, {args.steps} steps, packed rows; "
             f"{platform.node()}, torch {torch.__version__}, transformers "
             f"{transformers.__version__}. Measured: each rank's peak resident set while "
             "training (reset when training begins) and over the whole process (loading "
             "included). Command (the engine flag differs per row):", "",
             "    " + " ".join(rows[0]["command"]), "",
             "| strategy | plan per rank (GiB) | measured training peak, rank 0 / 1 (GiB) "
             "| plan error | resident when training began (GiB) | process peak incl. loading (GiB) "
             "| frozen base held per rank (GiB) | plan's weights term (GiB) | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        plan = row["plan"]["memory"]["per_device_peak_bytes"] / 2**30
        measured = max(row["training"])
        lines.append(
            f"| {row['label']} | {plan:.2f} | {' / '.join(f'{m:.2f}' for m in row['training'])} "
            f"| {(plan - measured) / measured:+.0%} | "
            f"{' / '.join(f'{m:.2f}' for m in row['at_start'])} | "
            f"{' / '.join(f'{m:.2f}' for m in row['process'])} | {row['frozen'][0]:.3f} | "
            f"{row['plan']['memory']['weights'] / 2**30:.3f} | {row['tokens_per_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
