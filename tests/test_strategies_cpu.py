"""Every strategy the planner can choose, for real, on 2 CPU processes through the CLI.

DDP QLoRA, FSDP LoRA and QLoRA (FSDP1, gloo), DeepSpeed ZeRO-3 LoRA and QLoRA: each
trains the tiny model, saves plain PEFT files that load onto the base, merges, and
after a SIGTERM (exit 75 with a stop checkpoint on every rank) and a rank killed
mid-run (restarted in the job by the launcher) ends with the adapter bytes of the
uninterrupted run.
FSDP's checkpoints reshard (2 -> 1 -> 2 processes, global batch kept); DeepSpeed's
per-rank ZeRO partitions are refused on another process count with the way out.
What each rank holds is read off the wrapped model (shard_report in each rank's
report): 1/2 of the frozen base, decoder layers as FSDP units, only LoRA trained,
in fp32, no optimizer state for the base. DDP LoRA's rows are tests/test_resume_cpu.py.

LoRA dropout is 0 here: the process-count changes compare runs whose dropout masks
would differ (the RNG restore with dropout is tests/test_resume_cpu.py's).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import assert_user_error, run_ftlaunch, tree
from jobs import (adapter, assert_same_adapter, fault_env, job_processes, logged_steps, losses,
                  restart_lines, start, wait)

pytestmark = pytest.mark.slow
pytest.importorskip("bitsandbytes")

STRATEGIES = {
    "ddp-qlora": ("--method", "qlora"),
    "fsdp-lora": ("--engine", "fsdp", "--method", "lora"),
    "fsdp-qlora": ("--engine", "fsdp", "--method", "qlora"),
    "zero3-lora": ("--engine", "deepspeed", "--method", "lora"),
    "zero3-qlora": ("--engine", "deepspeed", "--method", "qlora"),
}
# 8 steps of 4 examples, a checkpoint every 2 steps (all three kept), a loss logged every step.
RUN = ("--model", "tiny", "--max-steps", "8", "--global-batch-size", "4", "--seq-len", "64",
       "--set", "logging_steps=1", "--set", "save_steps=2", "--set", "learning_rate=5e-3",
       "--set", "lora.lora_dropout=0", "--set", "save_total_limit=3")
PREEMPTED_EXIT = 75
DISTRIBUTED_TYPE = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero3": "DEEPSPEED"}
_references: dict[str, Path] = {}


def args(strategy: str, run_dir: Path, gpus: str = "2") -> tuple[str, ...]:
    return (*RUN, *STRATEGIES[strategy], "--gpus", gpus, "--output-dir", str(run_dir))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """strategy -> its uninterrupted run directory (trained once, on first use)."""
    def get(strategy: str) -> Path:
        if strategy not in _references:
            run_dir = tmp_path_factory.mktemp(strategy) / "run"
            proc = run_ftlaunch(*args(strategy, run_dir))
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            _references[strategy] = run_dir
        return _references[strategy]
    return get


def ranks(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]


def rank_files(checkpoint: Path, strategy: str) -> set[str]:
    """The per-rank files a complete checkpoint of this strategy must hold."""
    engine = strategy.split("-")[0]
    if engine == "fsdp":
        return {f"{d}/__{r}_0.distcp" for d in ("pytorch_model_fsdp_0", "optimizer_0")
                for r in (0, 1)}
    if engine == "zero3":
        step = checkpoint.name.split("-")[1]
        return {f"global_step{step}/zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt"
                for r in (0, 1) for kind in ("optim", "model")}
    return {"adapter_model.safetensors", "optimizer.pt"}


def assert_complete(checkpoint: Path, strategy: str) -> None:
    files = {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()}
    wanted = rank_files(checkpoint, strategy) | {"rng_state_0.pth", "rng_state_1.pth",
                                                 "ftlaunch-checkpoint.json"}
    assert wanted <= files, sorted(wanted - files)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_trains_on_every_rank_saves_a_plain_adapter_and_merges(strategy, reference):
    run_dir = reference(strategy)
    engine, method = strategy.split("-")
    config = yaml.safe_load((run_dir / "accelerate.yaml").read_text())
    assert config["distributed_type"] == DISTRIBUTED_TYPE[engine]
    assert config["num_processes"] == 2
    plan = yaml.safe_load((run_dir / "run.yaml").read_text())["plan"]
    assert (plan["method"], plan["engine"]) == (method, {"zero3": "deepspeed",
                                                         "ddp": "cpu"}.get(engine, engine))
    reports = ranks(run_dir)
    assert [(r["rank"], r["world_size"], r["global_step"]) for r in reports] == [(0, 2, 8),
                                                                                (1, 2, 8)]
    assert reports[0]["data_digest"] != reports[1]["data_digest"]  # each rank its own share
    assert {r["base_weights"] for r in reports} == {"nf4" if method == "qlora" else "float32"}
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6"):
        assert_complete(run_dir / "checkpoints" / name, strategy)

    # Plain PEFT files: PeftModel loads them onto the unquantized base, every tensor.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        yaml.safe_load((run_dir / "run.yaml").read_text())["model"]["load_from"])
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    saved = adapter(run_dir)
    loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert saved and set(saved) == set(loaded)
    assert all(torch.equal(saved[n], loaded[n].detach().to(saved[n].dtype)) for n in saved)
    assert any(t.abs().sum() > 0 for n, t in saved.items() if "lora_B" in n)  # it trained

    if engine == "zero3":
        _assert_zero3_files(run_dir, method)

    merged = run_ftlaunch("merge", str(run_dir))
    assert merged.returncode == 0, merged.stdout + merged.stderr
    record = json.loads((run_dir / "merged" / "ftlaunch-merge.json").read_text())
    assert record["max_abs_logit_diff"] <= record["tolerance"]
    assert record["adapter_effect"] > 10 * record["tolerance"]


def _assert_zero3_files(run_dir: Path, method: str) -> None:
    """ds_config.json agrees with the plan; DeepSpeed's own checkpoint files hold one
    optimizer partition per rank and no frozen base weight (what the disk preflight's
    estimate relies on: it covers the real checkpoint within 25 %)."""
    import torch

    from ftlaunch.plan import job as job_mod
    from ftlaunch.launch import preflight

    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 4
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    checkpoint = run_dir / "checkpoints" / "checkpoint-2"
    for states in (checkpoint / "global_step2").glob("*model_states.pt"):
        module = torch.load(states, map_location="cpu", weights_only=False)["module"]
        # Partitioned weights are saved empty; QLoRA's bitsandbytes quant-state buffers
        # (absmax, quant_map: 1/64 of the 4-bit weight or less) are saved as they are.
        frozen = {n: t for n, t in module.items() if ".lora_" not in n}
        assert frozen and all(t.numel() == 0 for n, t in frozen.items() if n.endswith(".weight"))
    job = job_mod.resolve(job_mod.Options(model="tiny", gpus="2", engine="deepspeed",
                                          method=method, max_steps=8, seq_len=64,
                                          global_batch_size=4))
    measured = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    tokenizer = preflight.tokenizer_bytes(
        yaml.safe_load((run_dir / "run.yaml").read_text())["model"]["tokenizer"])
    estimate = preflight.checkpoint_bytes(job.plan, job.model, tokenizer)
    assert measured <= estimate <= 1.25 * measured, (estimate, measured)


def test_sharded_engines_hold_half_the_base_and_train_only_the_adapter(reference):
    """Read off what trained (ranks/rank-N.json "sharding"), against DDP QLoRA's replica."""
    replica = ranks(reference("ddp-qlora"))[0]["sharding"]
    assert replica["engine"] == "replicated"
    for strategy in ("fsdp-qlora", "zero3-qlora"):
        for held in (r["sharding"] for r in ranks(reference(strategy))):
            # This rank's share of the frozen 4-bit base (and the 16-bit rest): half, besides
            # what ZeRO-3 keeps whole everywhere (below 10 x hidden elements: tiny's norms
            # and its smallest packed 4-bit matrices; nothing of a real model's weights).
            persistent = held.get("persistent_frozen_bytes", 0)
            assert persistent < 0.1 * replica["frozen_bytes"]
            assert held["frozen_bytes"] - persistent == pytest.approx(
                replica["frozen_bytes"] / 2, rel=0.02)
            trainable = held["trainable"]
            assert trainable["dtypes"] == ["float32"] and trainable["not_lora"] == []
            assert trainable["tensors"] == replica["trainable"]["tensors"]
            assert trainable["numel"] == replica["trainable"]["numel"] // 2
            # AdamW's two moments of this rank's adapter share, nothing for the base.
            assert held["optimizer_state_numel"] == 2 * trainable["numel"]
    fsdp = ranks(reference("fsdp-qlora"))[0]["sharding"]
    folder = yaml.safe_load((reference("fsdp-qlora") / "run.yaml").read_text())["model"]["load_from"]
    layers = json.loads((Path(folder) / "config.json").read_text())["num_hidden_layers"]
    # Each decoder layer is its own FSDP unit (and each LoRA matrix, trainable, its own).
    assert fsdp["units"]["LlamaDecoderLayer"] == layers
    assert fsdp["units"]["Linear"] == replica["trainable"]["tensors"]
    assert ranks(reference("zero3-qlora"))[0]["sharding"]["partitioned_parameters"] > 0


# The QLoRA variant of each engine: LoRA's checkpoints go through the same engine code (a
# sharded state dict, ZeRO partitions, DDP's plain one), and its training is tested above.
@pytest.mark.parametrize("strategy", [name for name in STRATEGIES if name.endswith("qlora")])
def test_sigterm_then_a_killed_rank_then_resume_is_bitwise_the_uninterrupted_run(
        strategy, reference, tmp_path):
    expected = reference(strategy)
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    # SIGTERM to the whole group once the run is past checkpoint-2 (a whole-job SIGKILL,
    # at random moments and while a checkpoint is written, is tests/test_resume_cpu.py's).
    launcher = start(*args(strategy, run_dir), log=log)
    assert wait(lambda: (run_dir / "checkpoints" / "checkpoint-2").is_dir()
                and logged_steps(run_dir) > 2, launcher, poll=0.01), log.read_text()[-3000:]
    workers = [p for p in job_processes(launcher) if "ftlaunch.worker.main" in p.cmdline()
               and "accelerate.commands.launch" not in p.cmdline()]
    assert len(workers) == 2
    os.killpg(launcher.pid, signal.SIGTERM)  # the whole group, as a scheduler sends it
    assert launcher.wait(timeout=120) == PREEMPTED_EXIT, log.read_text()[-3000:]
    assert "Preempted (SIGTERM)" in log.read_text() and "exit code 75" in log.read_text().lower()
    stop = json.loads((run_dir / "stopped.json").read_text())
    assert 2 < stop["step"] < 8
    assert_complete(Path(stop["checkpoint"]), strategy)  # every rank's part of it
    assert not (run_dir / "adapter").exists()
    psutil.wait_procs(workers, timeout=10)
    assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    # The last launch: rank 1 SIGKILLs itself once, after the step it resumes from; the
    # launcher restarts both ranks in the job from the newest complete checkpoint.
    final = run_ftlaunch(*args(strategy, run_dir),
                         env=fault_env("sigkill", stop["step"] + 1, once=tmp_path / "killed",
                                       rank=1))
    output = log.read_text() + final.stdout
    assert final.returncode == 0, output[-3000:] + final.stderr[-2000:]
    assert f"resuming {run_dir} from checkpoint-{stop['step']}" in final.stdout
    [restart] = restart_lines(final.stdout)
    assert "rank 1 (pid " in restart and "was killed by SIGKILL" in restart, restart
    assert losses(run_dir) == losses(expected)
    assert_same_adapter(run_dir, expected)
    if strategy == "ddp-qlora":
        again = run_ftlaunch("resume", str(run_dir))
        assert again.returncode == 0 and "already finished" in again.stdout


def _continue_elsewhere(source: Path, run_dir: Path, last: str) -> None:
    """A copy of a run as if it had stopped right after `last` (later checkpoints and
    the finished adapter gone)."""
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("adapter", "merged", "ranks"))
    for checkpoint in (run_dir / "checkpoints").glob("checkpoint-*"):
        if int(checkpoint.name.split("-")[1]) > int(last.split("-")[1]):
            shutil.rmtree(checkpoint)


def _assert_tracks(run_dir: Path, expected: Path, since: int) -> None:
    got, want = losses(run_dir), losses(expected)
    assert [s for s, _ in got] == list(range(1, 9))  # the copied lines up to `since`, then new
    # Another process count sums the same samples in another order: float rounding only.
    for (_, a), (_, b) in zip(got[since:], want[since:]):
        assert abs(a - b) < 1e-4 * abs(b), (got, want)


def test_fsdp_qlora_checkpoints_reshard_two_to_one_to_two(reference, tmp_path):
    """(FSDP LoRA's checkpoints are the same kind of files: torch distributed checkpoints
    of the adapter and AdamW's state; one case of the two keeps make test's time.)"""
    expected = reference("fsdp-qlora")
    # 2 -> 1: checkpoint-2 of the 2-process run, resumed on one process (still FSDP).
    one = tmp_path / "one"
    _continue_elsewhere(expected, one, "checkpoint-2")
    proc = run_ftlaunch("resume", str(one), "--gpus", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert ("checkpoint-2 was written by 2 processes (micro-batch 2 x accumulation 1); resuming "
            "on 1 (micro-batch 4 x accumulation 1), global batch 4") in proc.stdout
    report = json.loads((one / "ranks" / "rank-0.json").read_text())
    assert (report["world_size"], report["sharding"]["engine"]) == (1, "fsdp")
    assert yaml.safe_load((one / "accelerate.yaml").read_text())["num_processes"] == 1
    _assert_tracks(one, expected, since=2)
    manifest = json.loads((one / "checkpoints" / "checkpoint-4" / "ftlaunch-checkpoint.json")
                          .read_text())
    assert manifest["world_size"] == 1

    # 1 -> 2: checkpoint-4, written by that one process, resumed on two.
    two = tmp_path / "two"
    _continue_elsewhere(one, two, "checkpoint-4")
    proc = run_ftlaunch("resume", str(two), "--gpus", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "checkpoint-4 was written by 1 process (micro-batch 4 x accumulation 1)" in proc.stdout
    assert [r["world_size"] for r in ranks(two)] == [2, 2]
    _assert_tracks(two, expected, since=2)


def test_a_zero3_checkpoint_on_another_process_count_is_refused_with_the_way_out(
        reference, tmp_path):
    run_dir = tmp_path / "run"
    _continue_elsewhere(reference("zero3-lora"), run_dir, "checkpoint-4")
    before = tree(run_dir)
    result = run_ftlaunch("resume", str(run_dir), "--gpus", "1")
    assert_user_error(result, "checkpoint-4 holds DeepSpeed ZeRO partitions for 2 processes",
                      "--gpus 2", "--fresh")
    assert tree(run_dir) == before


def test_zero3_offload_trains_and_resumes_bitwise(tmp_path, capsys):
    """ZeRO-3 QLoRA with parameters and optimizer state offloaded (the planner's variant
    when no GPU holds the shards): the plan is taken from the CLI's own resolution and
    given offload, as the planner would on GPUs too small; FSDP's offload does not run
    on CPU ranks (torch pins host memory for copies to an accelerator)."""
    import dataclasses

    from ftlaunch.plan import job as job_mod
    from ftlaunch.launch import start

    run_dir = tmp_path / "run"
    options = job_mod.Options(model="tiny", gpus="2", engine="deepspeed", method="qlora",
                              max_steps=4, seq_len=64, global_batch_size=4,
                              sets=("logging_steps=1", "save_steps=2", "lora.lora_dropout=0"),
                              output_dir=str(run_dir))
    job = job_mod.resolve(options)
    job = dataclasses.replace(job, plan=dataclasses.replace(job.plan, offload=True))
    assert start.start_run(job, ["--model", "tiny"], print) == 0, capsys.readouterr().out[-3000:]
    zero = json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]
    assert zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "cpu"
    first = adapter(run_dir)

    shutil.rmtree(run_dir / "adapter")  # as if stopped after checkpoint-2 (the only one)
    assert start.start_run(job, ["--model", "tiny"], print) == 0, capsys.readouterr().out[-3000:]
    assert f"resuming {run_dir} from checkpoint-2" in capsys.readouterr().out
    import torch

    again = adapter(run_dir)
    assert sorted(first) == sorted(again)
    assert all(torch.equal(first[n], again[n]) for n in first)
