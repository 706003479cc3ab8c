"""ftlaunch against a plain TRL script on CPU: same model, data, seq len, batch, steps, seed.

    FTLAUNCH_CACHE=/tmp/benchcache .venv/bin/python bench/cpu_vs_trl.py \
        [--models tiny,smollm2-135m] [--steps N] [--repeat 3] [--append]

For each model, per repetition (the order rotates from one repetition to the next):
  plain, TRL defaults  bench/plain_sft.py with what a tutorial sets (model, data, LoRA shape,
                       batch, steps, learning-rate schedule, max_length, seed, logging), the
                       CPU must-haves (use_cpu, bf16=False, fp32 weights) and assistant-only
                       loss on the same chat template as ftlaunch; TRL's defaults otherwise
                       (gradient checkpointing on, adamw_torch_fused, save_steps 500)
  plain, matched       the same script with what ftlaunch's plan and recipe set: gradient
                       checkpointing and packing as planned, adamw_torch, save_steps
  ftlaunch             .venv/bin/ftlaunch --model M --gpus 1 --recipe demo ... on a fresh
                       output directory (so the launcher tokenizes the data every time)
Every run is a fresh process started by this script with its own empty HF datasets cache;
wall time is from the start of the process to its exit, start-up included. The machine
must be otherwise idle: each run waits until other processes use under 5 % of the CPUs,
and a run during which they used more is measured again (--attempts; on 2 cores someone
else's test suite slows a run down 2-10x). Peak memory:
the process tree's summed RSS sampled every 0.2 s (ftlaunch runs the launcher,
`accelerate launch` and the worker as three processes), the same sum without file-backed
pages (anonymous memory: what the processes allocated; the shared libraries' pages, which
the summed RSS counts once per process, left out), and the kernel's high-water RSS of the
largest single process (wait4). With --keep, every run's directory and timestamped output
and results.json (all figures) stay in that folder.

Trained tokens are the tokens with a label (labels != -100, what the loss is on) in the
batches of the steps trained, counted by plain_sft.py's collator wrapper. ftlaunch trains
on the same batches (checked: the SHA-256 over every collated batch's input ids that
ftlaunch's workers write into ranks/rank-0.json equals plain_sft.py's), so its trained
tokens are the same number; its tokens/s divide that by its own time in trainer.train()
(ranks/rank-0.json "seconds"), measured as plain_sft.py measures its own.

Prints markdown tables (median and min-max over the repetitions; ratios are per
repetition, ftlaunch against the plain run of the same repetition) and, with --append,
appends them with the date, machine, versions and this command to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import plain_sft  # bench/, beside this script
import psutil

from ftlaunch.run import record as run_record

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FTLAUNCH = str(BIN / "ftlaunch")
PLAIN = str(ROOT / "bench" / "plain_sft.py")
DATA = ROOT / "recipes" / "data" / "demo-arithmetic.jsonl"
BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"
HEADING = "## ftlaunch vs a plain TRL script on CPU"
DEFAULT_STEPS = {"tiny": 40, "smollm2-135m": 20}
VARIANTS = ("plain, TRL defaults", "plain, matched", "ftlaunch")
SAMPLE_S = 0.2


# ---------------------------------------------------------------- a quiet machine

CPUS = os.cpu_count() or 1
BUSY_LIMIT = 0.05  # other processes' share of the machine above which a run is repeated


def machine_cpu() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, stolen by the hypervisor) since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def wait_until_quiet(max_wait_s: float) -> None:
    """Wait until other processes use under BUSY_LIMIT of the machine for 2 s in a row."""
    waited = 0.0
    while True:
        before = machine_cpu()[0]
        time.sleep(2)
        share = (machine_cpu()[0] - before) / (2 * CPUS)
        if share < BUSY_LIMIT or waited >= max_wait_s:
            if waited:
                print(f"  (waited {waited:.0f} s for other processes to finish)", flush=True)
            return
        if not waited:
            print(f"  other processes use {share:.0%} of the machine: waiting", flush=True)
        time.sleep(8)
        waited += 10


# ---------------------------------------------------------------- running one process

class Measured:
    """One process run to its exit: wall time, peak memory of its tree, its output lines
    with the time each arrived (seconds from the start)."""

    def __init__(self, argv: list[str], env: dict, log: Path):
        self.lines: list[tuple[float, str]] = []
        self.peak_rss = self.peak_anon = 0
        self.spawned: list[tuple[float, str]] = []  # (s from the start, command line)
        self.start_epoch = time.time()
        self.log = log
        machine_before, own_before = machine_cpu(), resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        stop = threading.Event()
        reader = threading.Thread(target=self._read, args=(proc, start), daemon=True)
        sampler = threading.Thread(target=self._sample, args=(proc.pid, stop, start),
                                   daemon=True)
        reader.start()
        sampler.start()
        # wait4, not Popen.wait: its rusage is the child's, with the descendants it reaped.
        _, status, usage = os.wait4(proc.pid, 0)
        self.wall_s = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        reader.join()
        sampler.join()
        self.returncode = proc.returncode
        self.largest_maxrss = usage.ru_maxrss * 1024  # KiB on Linux
        # CPU time of processes that are neither this run nor this script: on a shared
        # machine, someone else's work slows the run down and the figures mean nothing.
        machine_after, own_after = machine_cpu(), resource.getrusage(resource.RUSAGE_SELF)
        own = (own_after.ru_utime + own_after.ru_stime) - (own_before.ru_utime + own_before.ru_stime)
        self.cpu_s = usage.ru_utime + usage.ru_stime
        busy = machine_after[0] - machine_before[0]
        self.foreign_share = max(0.0, busy - self.cpu_s - own) / (self.wall_s * CPUS)
        self.steal_share = (machine_after[1] - machine_before[1]) / (self.wall_s * CPUS)
        log.write_text("".join(f"[{t:8.3f}] {line}\n" for t, line in self.lines),
                       encoding="utf-8")
        if self.returncode != 0:
            tail = "\n".join(line for _, line in self.lines[-30:])
            raise SystemExit(f"failed ({self.returncode}): {shlex.join(argv)}\n{tail}")

    def _read(self, proc, start: float) -> None:
        pending = b""
        fd = proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            now = time.perf_counter() - start
            if not chunk:
                break
            pending += chunk
            *done, pending = re.split(rb"[\r\n]", pending)
            self.lines.extend((now, part.decode(errors="replace")) for part in done if part.strip())
        if pending.strip():
            self.lines.append((time.perf_counter() - start, pending.decode(errors="replace")))
        proc.stdout.close()

    def _sample(self, pid: int, stop: threading.Event, start: float) -> None:
        try:
            root = psutil.Process(pid)
        except psutil.Error:
            return
        seen: set[int] = set()
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            rss = anon = 0
            for p in procs:
                if p.pid not in seen:  # when each process of the tree was first seen
                    seen.add(p.pid)
                    try:
                        self.spawned.append((time.perf_counter() - start, " ".join(p.cmdline())))
                    except psutil.Error:
                        pass
                try:  # /proc/PID/statm: cheap (smaps, for PSS, costs ~30 ms per GB of RSS)
                    info = p.memory_info()
                    rss += info.rss
                    anon += info.rss - info.shared
                except psutil.Error:
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_anon = max(self.peak_anon, anon)
            stop.wait(SAMPLE_S)

    def all(self, pattern: str) -> list[float]:
        """When each output line matching `pattern` arrived (s from the start)."""
        return [t for t, line in self.lines if re.search(pattern, line)]

    def first(self, pattern: str) -> float | None:
        """When the first output line matching `pattern` arrived (s from the start)."""
        return next(iter(self.all(pattern)), None)


# ---------------------------------------------------------------- the settings

def plan(model: str, recipe_name: str, steps: int, seq_len: int, batch: int, env: dict) -> dict:
    out = subprocess.run([FTLAUNCH, "plan", "--model", model, "--gpus", "1", "--recipe",
                          recipe_name, "--max-steps", str(steps), "--seq-len", str(seq_len),
                          "--global-batch-size", str(batch), "--data", str(DATA), "--json"],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def ftlaunch_argv(model: str, recipe_name: str, steps: int, seq_len: int, batch: int,
                  seed: int, out: Path) -> list[str]:
    return [FTLAUNCH, "--model", model, "--gpus", "1", "--recipe", recipe_name,
            "--data", str(DATA), "--max-steps", str(steps), "--seq-len", str(seq_len),
            "--global-batch-size", str(batch), "--set", f"seed={seed}", "--output-dir", str(out)]


def plain_argv(variant: str, model_dir: str, rec: dict, the_plan: dict, steps: int,
               template: Path | None, out: Path) -> list[str]:
    argv = [sys.executable, PLAIN, model_dir, str(DATA), "--out", str(out),
            *plain_sft.recipe_flags(rec, the_plan, steps)]
    if template is not None:
        argv += ["--chat-template", str(template)]
    if variant == "plain, matched":
        argv += ["--gradient-checkpointing", "on" if the_plan["gradient_checkpointing"] else "off",
                 "--optim", "adamw_torch",  # ftlaunch's optimizer on CPU (plan/trainer_args.py)
                 "--packing", "on" if rec["data"].get("packing", True) else "off",
                 "--save-steps", str(int(rec["training"].get("save_steps", 500)))]
    return argv


def training_template(model_dir: str, work: Path) -> Path | None:
    """The chat template ftlaunch trains this model with, as a .jinja file for the plain
    script, or None when it is the model's own (the plain script then needs none)."""
    from transformers import AutoTokenizer

    from ftlaunch.data import chat_templates

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template, source = chat_templates.choose(tokenizer)
    if template == tokenizer.chat_template:
        return None
    path = work / f"{Path(model_dir).name}.chat_template.jinja"
    path.write_text(template, encoding="utf-8")
    print(f"  chat template for the plain script: {source} -> {path}")
    return path


# ---------------------------------------------------------------- reading the results

def steady_step_s(log_times: list[float], steps: int) -> float:
    """Seconds per step between the first and the last loss log: the steady state, without
    the first steps' warm-up (both log every logging_steps steps)."""
    if len(log_times) < 2:
        return float("nan")
    per_log = steps / len(log_times)
    return (log_times[-1] - log_times[0]) / (per_log * (len(log_times) - 1))


def plain_result(m: Measured, out: Path) -> dict:
    r = json.loads((out / "result.json").read_text(encoding="utf-8"))
    marks = {k: v - m.start_epoch for k, v in r["marks_epoch"].items()}
    train_start = marks["train_start"]
    return {
        "wall_s": m.wall_s, "train_s": r["train_seconds"], "trained_tokens": r["trained_tokens"],
        "final_loss": r["final_loss"], "digest": r["data_digest"], "steps": r["global_step"],
        "peak_rss": m.peak_rss, "peak_anon": m.peak_anon, "largest_maxrss": m.largest_maxrss,
        "startup_s": train_start, "after_s": m.wall_s - train_start - r["train_seconds"],
        "step_s": steady_step_s(m.all(r"\{'loss'"), r["global_step"]),
        "settings": r["settings"],
        "phases": {
            "interpreter + imports": marks["imported"],
            "tokenizer + model load": marks["model_loaded"] - marks["imported"],
            "load_dataset": marks["data_loaded"] - marks["model_loaded"],
            "SFTTrainer() (tokenizes)": train_start - marks["data_loaded"],
            "train": r["train_seconds"],
            "save adapter + exit": m.wall_s - train_start - r["train_seconds"],
        },
    }


def ftlaunch_result(m: Measured, out: Path) -> dict:
    rank = json.loads((out / "ranks" / "rank-0.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row for row in rows if "loss" in row]
    record = run_record.load(out)
    # The last step's log is written at the end of the last step: trainer.train() began
    # `seconds` before it (to within the few ms the Trainer takes after its last log).
    train_end = losses[-1]["time"] - m.start_epoch
    train_start = train_end - rank["seconds"]
    launching = m.first(r"^Launching")
    if launching is None:
        raise SystemExit(f"ftlaunch printed no 'Launching' line; see {m.log}")
    loading = m.first(r"Loading weights") or train_start
    worker = next((t for t, cmd in m.spawned
                   if "ftlaunch.worker.main" in cmd and "accelerate" not in cmd), launching)
    phases = {
        "launcher: imports, plan, data cache, run files": launching,
        "until the worker process starts": worker - launching,
        "worker: imports, data-cache load, tokenizer": loading - worker,
        "model load + SFTTrainer()": train_start - loading,
        "train": rank["seconds"],
        "rank report, adapter, loss.png, exit": m.wall_s - train_end,
    }
    return {
        "wall_s": m.wall_s, "train_s": rank["seconds"], "trained_tokens": None,
        "final_loss": losses[-1]["loss"], "digest": rank["data_digest"],
        "steps": rank["global_step"], "peak_rss": m.peak_rss, "peak_anon": m.peak_anon,
        "largest_maxrss": m.largest_maxrss, "startup_s": train_start,
        "after_s": m.wall_s - train_end, "phases": phases,
        "step_s": steady_step_s([row["time"] for row in losses], rank["global_step"]),
        "own_tokens_per_s": statistics.median(row["trained_tokens_per_s"] for row in losses
                                              if "trained_tokens_per_s" in row),
        "plan": record.plan,
    }


# ---------------------------------------------------------------- the report

def spread(values, fmt: str, unit: str = "") -> str:
    """median (min-max)"""
    values = list(values)
    if len(values) == 1:
        return format(values[0], fmt) + unit
    return (f"{format(statistics.median(values), fmt)}{unit} "
            f"({format(min(values), fmt)}-{format(max(values), fmt)})")


GIB = 2**30


def model_table(model: str, steps: int, runs: dict[str, list[dict]]) -> str:
    ft = runs["ftlaunch"]
    tokens = {r["trained_tokens"] for v in VARIANTS for r in runs[v]}
    lines = [f"### {model}: {steps} steps, {len(ft)} repetitions, "
             f"{'/'.join(str(t) for t in sorted(tokens))} trained tokens per run", "",
             "| variant | trained tokens/s | train s | steady s/step | wall s | start-up s "
             "| after training s | peak RSS, tree GiB | peak anon RSS, tree GiB "
             "| largest process GiB | final loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        rs = runs[v]
        lines.append(
            f"| {v} | {spread((r['tokens_per_s'] for r in rs), '.0f')} "
            f"| {spread((r['train_s'] for r in rs), '.2f')} "
            f"| {spread((r['step_s'] for r in rs), '.3f')} "
            f"| {spread((r['wall_s'] for r in rs), '.1f')} "
            f"| {spread((r['startup_s'] for r in rs), '.1f')} "
            f"| {spread((r['after_s'] for r in rs), '.1f')} "
            f"| {spread((r['peak_rss'] / GIB for r in rs), '.2f')} "
            f"| {spread((r['peak_anon'] / GIB for r in rs), '.2f')} "
            f"| {spread((r['largest_maxrss'] / GIB for r in rs), '.2f')} "
            f"| {spread((r['final_loss'] for r in rs), '.4f')} |")
    for v in VARIANTS[:2]:
        pairs = list(zip(ft, runs[v]))

        def ratio(key, pairs=pairs):
            return spread((a[key] / b[key] for a, b in pairs), ".2f", "x")

        same = all(a["digest"] == b["digest"] for a, b in pairs)
        loss = max(abs(a["final_loss"] - b["final_loss"]) for a, b in pairs)
        lines.append(
            f"| ftlaunch / {v} | {ratio('tokens_per_s')} | {ratio('train_s')} | {ratio('step_s')} "
            f"| {ratio('wall_s')} | {ratio('startup_s')} | {ratio('after_s')} "
            f"| {ratio('peak_rss')} | {ratio('peak_anon')} | {ratio('largest_maxrss')} "
            f"| {'same batches' if same else 'OTHER BATCHES'}, max diff {loss:.1e} |")
    lines.append("")
    for v in VARIANTS[:2]:
        pairs = list(zip(ft, runs[v]))
        speed = statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs)
        wall = statistics.median(a["wall_s"] / b["wall_s"] for a, b in pairs)
        lines.append(f"Against {v}: trained tokens/s {speed:.2f}x (target >= 1.0x: "
                     f"{'met' if speed >= 1.0 else 'missed'}), wall time {wall:.2f}x "
                     f"(target <= 1.15x: {'met' if wall <= 1.15 else 'missed'}).")
    lines.append("")
    lines.append("Where the wall time goes (median s):")
    lines.append("")
    for v in ("plain, matched", "ftlaunch"):
        names = list(runs[v][0]["phases"])
        parts = [f"{name} {statistics.median(r['phases'][name] for r in runs[v]):.1f}"
                 for name in names]
        lines.append(f"- {v}: " + "; ".join(parts))
    everything = [r for v in VARIANTS for r in runs[v]]
    lines.append(f"- other processes used at most "
                 f"{max(r['foreign_share'] for r in everything):.1%} of the machine during a "
                 f"run, the hypervisor stole at most {max(r['steal_share'] for r in everything):.1%}")
    own = statistics.median(r["own_tokens_per_s"] for r in ft)
    lines.append(f"- ftlaunch's own metrics.jsonl trained_tokens_per_s, median of its log "
                 f"lines: {own:.0f}")
    s = runs["plain, TRL defaults"][0]["settings"]
    lines.append(f"- TRL defaults here: gradient checkpointing {s['gradient_checkpointing']}, "
                 f"optim {s['optim']}, packing {s['packing']}; the plan: gradient checkpointing "
                 f"{ft[0]['plan']['gradient_checkpointing']}, precision "
                 f"{ft[0]['plan']['precision']}, micro-batch {ft[0]['plan']['per_device_batch_size']}"
                 f" x accumulation {ft[0]['plan']['gradient_accumulation_steps']}")
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / GIB:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}")


def versions() -> str:
    from ftlaunch.detect.runtime import runtime_versions

    found = runtime_versions()
    names = ("ftlaunch", "torch", "transformers", "peft", "trl", "accelerate", "datasets")
    return f"Python {found['python']}, " + ", ".join(f"{name} {found[name] or '-'}"
                                                    for name in names)


def append(block: str) -> None:
    text = BENCHMARKS.read_text(encoding="utf-8")
    if HEADING not in text:
        BENCHMARKS.write_text(text.rstrip("\n") + "\n\n" + HEADING + "\n\n" + block,
                              encoding="utf-8")
        return
    start = text.index(HEADING) + len(HEADING)
    following = text.find("\n## ", start)
    end = len(text) if following < 0 else following + 1
    section = text[:end].rstrip("\n") + "\n\n" + block
    BENCHMARKS.write_text(section + ("\n" + text[end:] if following >= 0 else ""),
                          encoding="utf-8")


# ---------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,smollm2-135m")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"steps per run (default {DEFAULT_STEPS})")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--seed", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--append", action="store_true",
                        help=f"append the tables to {BENCHMARKS.relative_to(ROOT)}")
    parser.add_argument("--attempts", type=int, default=3,
                        help="times a run is measured while other processes use more than "
                             f"{BUSY_LIMIT * 100:.0f} %% of the machine")
    parser.add_argument("--max-wait", type=float, default=1800,
                        help="seconds to wait for a quiet machine before each run")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep every run's directory under this folder")
    args = parser.parse_args()

    env = dict(os.environ)
    env.setdefault("FTLAUNCH_CACHE", str(Path(tempfile.gettempdir()) / "benchcache"))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    os.environ["FTLAUNCH_CACHE"] = env["FTLAUNCH_CACHE"]
    from ftlaunch.plan import recipe as recipes

    rec = recipes.load_recipe(args.recipe).to_json()  # the same recipe, defaults and all
    seed = args.seed if args.seed is not None else int(rec["training"].get("seed", 42))
    rec["training"]["seed"] = seed  # what both sides train with
    seq_len, batch = int(rec["seq_len"]), int(rec["global_batch_size"])
    work = args.keep or Path(tempfile.mkdtemp(prefix="cpu_vs_trl-"))
    work.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc)
    print(f"machine: {machine()}\n{versions()}\nruns in {work}", flush=True)

    tables = []
    commands = {}
    raw: dict = {}  # every run's figures, written to results.json in the work folder
    repeated = 0  # runs measured again because other processes were busy during them
    for model in args.models.split(","):
        steps = args.steps or DEFAULT_STEPS.get(model, 20)
        if steps % int(rec["training"]["logging_steps"]):
            # The steady step time and the end of training are read from the loss logs.
            raise SystemExit(f"--steps {steps} must be a multiple of the recipe's logging_steps "
                             f"({rec['training']['logging_steps']}).")
        the_plan = plan(model, args.recipe, steps, seq_len, batch, env)
        # A one-step ftlaunch run first: it builds the model folder as ftlaunch does (the
        # plain script trains from the same folder) and warms the page cache for both.
        warm = work / f"{model}-warmup"
        Measured(ftlaunch_argv(model, args.recipe, 1, seq_len, batch, seed, warm),
                 {**env, "HF_DATASETS_CACHE": str(warm / "hf-datasets")}, work / f"{model}-warmup.log")
        model_dir = run_record.load(warm).model.load_from
        template = training_template(model_dir, work)
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for rep in range(args.repeat):
            order = VARIANTS[rep % 3:] + VARIANTS[:rep % 3]
            for variant in order:
                tag = {"plain, TRL defaults": "plain-default", "plain, matched": "plain-matched",
                       "ftlaunch": "ftlaunch"}[variant]
                out = work / f"{model}-{tag}-{rep}"
                run_env = {**env, "HF_DATASETS_CACHE": str(out / "hf-datasets")}
                if variant == "ftlaunch":
                    argv = ftlaunch_argv(model, args.recipe, steps, seq_len, batch, seed, out)
                else:
                    argv = plain_argv(variant, model_dir, rec, the_plan, steps, template, out)
                commands.setdefault((model, variant), argv)
                for attempt in range(1, args.attempts + 1):
                    wait_until_quiet(args.max_wait)
                    shutil.rmtree(out, ignore_errors=True)
                    m = Measured(argv, run_env, work / f"{model}-{tag}-{rep}.log")
                    if m.foreign_share < BUSY_LIMIT:
                        break
                    print(f"  other processes used {m.foreign_share:.0%} of the machine during "
                          f"this run (attempt {attempt}/{args.attempts})", flush=True)
                    repeated += attempt < args.attempts
                result = (ftlaunch_result if variant == "ftlaunch" else plain_result)(m, out)
                result["foreign_share"], result["steal_share"] = m.foreign_share, m.steal_share
                runs[variant].append(result)
                print(f"  {model} rep {rep + 1}/{args.repeat} {variant:<20} wall {m.wall_s:6.1f} s  "
                      f"train {result['train_s']:6.2f} s  peak RSS {m.peak_rss / GIB:.2f} GiB  "
                      f"loss {result['final_loss']:.4f}  others {m.foreign_share:.1%}", flush=True)
        # Trained tokens: counted by the plain script; ftlaunch's batches are checked to be
        # the same ones (model_table says so), so they hold the same trained tokens.
        reference = runs["plain, matched"][0]["trained_tokens"]
        for v in VARIANTS:
            for r in runs[v]:
                if r["trained_tokens"] is None:
                    same = r["digest"] == runs["plain, matched"][0]["digest"]
                    r["trained_tokens"] = reference if same else float("nan")
                r["tokens_per_s"] = r["trained_tokens"] / r["train_s"]
        tables.append(model_table(model, steps, runs))
        raw[model] = {"steps": steps, "runs": runs}
        (work / "results.json").write_text(json.dumps(raw, indent=1, default=str) + "\n",
                                           encoding="utf-8")

    command = ("FTLAUNCH_CACHE=" + shlex.quote(env["FTLAUNCH_CACHE"]) + " .venv/bin/python "
               + shlex.join(["bench/cpu_vs_trl.py", *sys.argv[1:]]))
    shown = []
    for (model, variant), argv in commands.items():
        if variant == "plain, TRL defaults" or model != args.models.split(",")[-1]:
            continue
        text = shlex.join(argv).replace(str(work), "$WORK").replace(str(ROOT) + "/", "")
        shown.append(f"    # {variant}\n    {text}")
    block = (f"### {started:%Y-%m-%d}\n\n    {command}\n\n"
             f"Machine: {machine()}. {versions()}. Each run one fresh process started by the "
             f"bench, its wall time from start to exit; recipe `{args.recipe}` (micro-batch "
             f"{batch}, seq {seq_len}, seed {seed}), data {DATA.relative_to(ROOT)}. The runs of "
             f"the last model (the TRL-defaults run is the matched one without its last four "
             f"flags):\n\n" + "\n".join(shown) + "\n\n"
             + (f"{repeated} runs were measured again: other processes were busy during "
                f"them.\n\n" if repeated else "")
             + "\n".join(tables))
    print()
    print(block)
    if args.append:
        append(block)
        print(f"appended to {BENCHMARKS}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
