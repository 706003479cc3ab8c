"""GPU truth: ftlaunch's measured speed and memory against its own plan and against the
plain HF stack (a benchmark, not a test).

    python bench/gpu.py [--models llama-3.2-1b,qwen2.5-7b,llama-3.1-8b] [--steps 20]
                        [--seq-len 2048] [--append]
    python bench/gpu.py --dry-run --hardware 1xH100-80GB    # no GPU: plans and commands

For each model the architecture is built once with random weights into a local folder
(with ftlaunch's offline tokenizer: nothing is downloaded), then each configuration
runs through `ftlaunch` and through bench/plain_sft.py (transformers + peft + trl as a
tutorial writes them) with the same model folder, data, sequence length, micro-batch,
steps and seed:

    lora / qlora, plan's choice   what `ftlaunch --method M` plans on this GPU
    qlora, micro-batch 2, ckpt    the reference point: seq 2048, gradient checkpointing
                                  (torchtune publishes 7.4 GiB for Llama 3.1 8B)

Reported per row: trained tokens/s (labels that carry the loss) over the whole of
trainer.train() on both sides, counted by the plain script and checked to be the same
batches ftlaunch trained on (else "batches differ"), MFU in the 6N-per-token convention (a frozen base does less work
than that counts, so LoRA's real utilisation is lower than it reads), the
plan's per-device peak against torch's measured max_memory_allocated and
max_memory_reserved (reserved is what runs out), and the error of the plan.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import plain_sft  # bench/, beside this script

ROOT = Path(__file__).resolve().parent.parent
FTLAUNCH = str(Path(sys.executable).parent / "ftlaunch")
PLAIN = str(ROOT / "bench" / "plain_sft.py")
BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"
# Dense bf16 tensor-core peak per GPU, FLOP/s (vendor datasheets, without sparsity).
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362.1e12,
             "RTX4090": 165.2e12}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="llama-3.2-1b,qwen2.5-7b,llama-3.1-8b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ftlaunch-bench-gpu"))
    parser.add_argument("--hardware", help="with --dry-run: the GPU to plan for")
    parser.add_argument("--dry-run", action="store_true",
                        help="plan and print every command; build and train nothing")
    parser.add_argument("--append", action="store_true", help="append to docs/BENCHMARKS.md")
    args = parser.parse_args()
    if args.dry_run and not args.hardware:
        parser.error("--dry-run needs --hardware (e.g. 1xH100-80GB): there is no GPU to detect")
    args.work.mkdir(parents=True, exist_ok=True)
    data = write_data(args.work / "data.jsonl", args.seq_len)
    rows = []
    for name in args.models.split(","):
        folder = args.work / f"{name}-random" if not args.dry_run else None
        if folder is not None:
            build_model_folder(name, folder)
        for config in CONFIGURATIONS:
            rows.append(run_configuration(name, folder, config, data, args))
    table = render(rows, args)
    print(table)
    if args.append and not args.dry_run:
        with open(BENCHMARKS, "a", encoding="utf-8") as out:
            out.write("\n" + table + "\n")
    return 0


CONFIGURATIONS = (
    {"label": "lora, plan's choice", "method": "lora", "batch": 8, "checkpointing": None},
    {"label": "qlora, plan's choice", "method": "qlora", "batch": 8, "checkpointing": None},
    {"label": "qlora, micro-batch 2, checkpointing", "method": "qlora", "batch": 2,
     "checkpointing": True},
)


def write_data(path: Path, seq_len: int, examples: int = 400) -> Path:
    """Plain-text examples long enough that packed rows are full at seq_len: the same
    file for ftlaunch and the plain script."""
    rng = random.Random(0)
    words = ["the", "model", "learns", "from", "tokens", "of", "text", "and", "numbers", "42",
             "adapter", "rank", "memory", "plan", "batch", "step", "loss", "node", "gpu"]
    with open(path, "w", encoding="utf-8") as out:
        for _ in range(examples):
            text = " ".join(rng.choice(words) for _ in range(seq_len // 2))
            out.write(json.dumps({"text": text}) + "\n")
    return path


def build_model_folder(name: str, folder: Path) -> None:
    """The preset's architecture with random bf16 weights (built on the GPU: far faster
    than on the CPU for 8B), saved once, with an offline tokenizer whose ids fit."""
    import torch

    from ftlaunch.models import builtin as builtin_models

    config = builtin_models.hf_config(name)

    def build():
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = builtin_models.build_random_model(config, seed=0, dtype=torch.bfloat16)
        return model, builtin_models.build_tokenizer(config["vocab_size"])

    builtin_models.materialize(folder, name, build)


def overrides(args) -> list[str]:
    """--set values both sides train with: a loss log every step (the memory peaks are
    read from them), no checkpoint within the run, one seed."""
    return ["logging_steps=1", f"save_steps={args.steps * 10}", "seed=0"]


def ftlaunch_args(model: str, config: dict, data: Path, args, out_dir: Path) -> list[str]:
    argv = ["--model", model, "--gpus", "1", "--method", config["method"],
            "--seq-len", str(args.seq_len), "--global-batch-size", str(config["batch"]),
            "--max-steps", str(args.steps), "--data", str(data), "--output-dir", str(out_dir)]
    for assignment in overrides(args):
        argv += ["--set", assignment]
    if config["checkpointing"] is not None:
        argv.append("--gradient-checkpointing" if config["checkpointing"]
                    else "--no-gradient-checkpointing")
    return argv


def run_configuration(name: str, folder: Path | None, config: dict, data: Path, args) -> dict:
    out_dir = args.work / "runs" / f"{name}-{config['method']}-{config['batch']}"
    model = str(folder) if folder is not None else name
    argv = ftlaunch_args(model, config, data, args, out_dir)
    plan_argv = ["plan", *argv, "--json"]
    if args.dry_run:
        plan_argv += ["--hardware", args.hardware]
        if folder is None:
            plan_argv += ["--random-init"]
    plan = json.loads(_run([FTLAUNCH, *plan_argv]).stdout)
    row = {"model": name, "config": config["label"], "plan": plan,
           "command": shlex.join(["ftlaunch", *argv])}
    plain = [sys.executable, PLAIN, *plain_args(model, plan, data, args)]
    if args.dry_run:
        print(f"would run: {row['command']}")
        print(f"would run: {shlex.join(plain)}")
        return row
    shutil.rmtree(out_dir, ignore_errors=True)
    _run([FTLAUNCH, *argv])
    row["ftlaunch"] = _measured(out_dir)
    plain_out = out_dir.with_name(out_dir.name + "-plain")
    shutil.rmtree(plain_out, ignore_errors=True)
    _run([*plain, "--out", str(plain_out)])
    row["plain"] = json.loads((plain_out / "result.json").read_text())
    return row


def plain_args(model: str, plan: dict, data: Path, args) -> list[str]:
    """The plain script with the recipe ftlaunch trains (the default one, with the same
    --set values) and exactly what the plan chose (micro-batch, accumulation,
    checkpointing, precision, 4-bit base, packing and ftlaunch's GPU optimizer), so the
    two differ only in how they run, not in what they train."""
    from ftlaunch.plan import recipe as recipes

    recipe = recipes.validate(recipes.apply_overrides(recipes.load_recipe(recipes.DEFAULT_RECIPE),
                                                      overrides(args))).to_json()
    argv = [model, str(data), *plain_sft.recipe_flags(recipe, plan, args.steps),
            "--save-steps", str(int(recipe["training"]["save_steps"])),
            "--device", "cuda", "--precision", plan["precision"],
            "--gradient-checkpointing", "on" if plan["gradient_checkpointing"] else "off",
            "--packing", "on" if recipe["data"].get("packing", True) else "off",
            "--optim", "paged_adamw_32bit"]
    if plan["method"] == "qlora":
        argv.append("--qlora")
    return argv


def _measured(out_dir: Path) -> dict:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rank = json.loads((out_dir / "ranks" / "rank-0.json").read_text())
    return {
        "train_s": rank["seconds"],
        "digest": rank["data_digest"],
        "peak_allocated_gib": max(r["peak_memory_gib"] for r in rows if "peak_memory_gib" in r),
        "peak_reserved_gib": max(r.get("peak_memory_reserved_gib", 0) for r in rows),
        "final_loss": [r for r in rows if "loss" in r][-1]["loss"],
    }


def mfu(tokens_per_s: float, plan: dict, gpu: str | None) -> float | None:
    peak = next((flops for key, flops in PEAK_BF16.items() if gpu and key in gpu.upper()), None)
    if peak is None:
        return None
    return tokens_per_s * 6 * plan["model"]["parameters"] / peak


def render(rows: list[dict], args) -> str:
    gpu = rows[0]["plan"]["hardware"]["gpu_name"] if rows else None
    head = [f"## GPU: ftlaunch vs the plain HF stack, and the plan vs measured memory "
            f"({dt.date.today().isoformat()})", "",
            f"Device: {gpu}; {_versions()}; `{' '.join(['python bench/gpu.py', *sys.argv[1:]])}`",
            "", "| model | configuration | plan: micro-batch, ckpt | plan peak GiB | allocated "
            "GiB | reserved GiB | plan error | ftlaunch tok/s | plain tok/s | ratio | MFU |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        plan = row["plan"]
        planned = plan["memory"]["per_device_peak_bytes"] / 2**30
        cells = [row["model"], row["config"],
                 f"{plan['per_device_batch_size']}, {'on' if plan['gradient_checkpointing'] else 'off'}",
                 f"{planned:.2f}"]
        if "ftlaunch" in row:
            ours, plain = row["ftlaunch"], row["plain"]
            reserved = ours["peak_reserved_gib"]
            cells += [f"{ours['peak_allocated_gib']:.2f}", f"{reserved:.2f}",
                      f"{(planned - reserved) / reserved:+.1%}"]
            if ours["digest"] == plain["data_digest"]:
                tokens_per_s = plain["trained_tokens"] / ours["train_s"]
                utilisation = mfu(tokens_per_s, plan, gpu)
                cells += [f"{tokens_per_s:.0f}", f"{plain['trained_tokens_per_s']:.0f}",
                          f"{tokens_per_s / plain['trained_tokens_per_s']:.2f}x",
                          f"{utilisation:.1%}" if utilisation is not None else "n/a"]
            else:
                cells += ["batches differ"] * 4
        else:
            cells += ["(dry run)"] * 7
        head.append("| " + " | ".join(cells) + " |")
    return "\n".join(head)


def _versions() -> str:
    from ftlaunch.detect.runtime import runtime_versions

    found = runtime_versions()
    names = ("python", "torch", "torch_cuda", "nccl", "gpu_driver", "transformers", "peft",
             "trl", "bitsandbytes", "accelerate")
    return ", ".join(f"{name} {found[name]}" for name in names if found.get(name))


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


if __name__ == "__main__":
    sys.exit(main())
