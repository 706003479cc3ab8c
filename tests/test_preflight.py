"""Preflight against real things: checkpoints the tiny model actually wrote (Trainer
format on one process, DeepSpeed ZeRO on two), filesystems of a known size, the
retention code that decides how many checkpoints coexist, and this interpreter's torch.

The estimates must not fall short of reality (a short estimate lets a run start that
then fills the disk) and must not be loose enough to refuse runs that fit.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import in_tmpfs
from ftlaunch.run import checkpoints
from ftlaunch.detect import hardware
from ftlaunch.models import presets as models
from ftlaunch.plan import planner
from ftlaunch.launch import preflight
from ftlaunch.detect import runtime
from ftlaunch.errors import UserError
from ftlaunch.plan.planner import TrainSpec

TINY = models.resolve("tiny")
# An estimate may be high by this much (per-file overheads rounded up, tokenizer guessed).
LOOSENESS = 1.25


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _tiny_run_plan(run_dir: Path) -> planner.Plan:
    """The plan tiny_run trained with (conftest.TINY_TRAIN: --gpus 1, --seq-len 128,
    --global-batch-size 4, the default recipe's LoRA), re-derived and checked against
    the run's run.yaml."""
    plan = planner.plan(hardware.detect(), TINY, TrainSpec(seq_len=128, global_batch_size=4,
                                                           processes_per_node=1))
    assert plan.to_json() == _record(run_dir)["plan"]
    return plan


def _record(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "run.yaml").read_text())


def _within(estimate: int, measured: int) -> bool:
    return measured <= estimate <= LOOSENESS * measured


# --- checkpoint size against real checkpoints ---------------------------------------------

def test_trainer_checkpoint_estimate_matches_the_real_checkpoint(tiny_run):
    _, run_dir = tiny_run
    complete = checkpoints.scan(run_dir / "checkpoints").complete
    # 12 steps, save_steps 6: step 6 saves, the last step writes adapter/ instead.
    assert [c.step for c in complete] == [6]
    assert preflight.saves_ahead(max_steps=12, save_steps=6) == len(complete)
    measured = _dir_bytes(complete[0].path)
    plan = _tiny_run_plan(run_dir)
    tokenizer = preflight.tokenizer_bytes(_record(run_dir)["model"]["tokenizer"])
    assert tokenizer and tokenizer < measured

    measured_tokenizer = preflight.checkpoint_bytes(plan, TINY, tokenizer)
    guessed_tokenizer = preflight.checkpoint_bytes(plan, TINY)
    assert _within(measured_tokenizer, measured), (measured_tokenizer, measured)
    assert _within(guessed_tokenizer, measured), (guessed_tokenizer, measured)


def test_the_final_adapter_fits_in_what_disk_needed_reserves(tiny_run):
    """Everything the finished run wrote (checkpoint, adapter, logs) within the need,
    and the need without its fixed margin no more than a few times the real thing."""
    _, run_dir = tiny_run
    plan = _tiny_run_plan(run_dir)
    tokenizer = preflight.tokenizer_bytes(_record(run_dir)["model"]["tokenizer"])
    needed, breakdown = preflight.disk_needed(plan, TINY, keep=2, max_steps=12, save_steps=6,
                                              tokenizer=tokenizer)
    written = _dir_bytes(run_dir)
    assert written <= needed
    assert "1 new checkpoint" in breakdown
    assert needed - preflight._DISK_MARGIN_BYTES <= 2 * written


# --- how many checkpoints coexist: the real retention code --------------------------------

def _peak_checkpoints(root: Path, keep: int | None, saves: int, existing: int) -> int:
    """Save `saves` checkpoints the way ftlaunch.worker.checkpointing does (finalize, then
    retain) after `existing` complete ones; the most new ones on disk at any moment."""
    step = 0
    for _ in range(existing):
        step += 1
        _save(root, step)
    peak = 0
    for _ in range(saves):
        step += 1
        _save(root, step)
        peak = max(peak, len(checkpoints.scan(root).complete) - existing)
        checkpoints.retain(root, keep)
    return peak


def _save(root: Path, step: int) -> None:
    staging = root / checkpoints.INCOMING / f"checkpoint-{step}"
    staging.mkdir(parents=True)
    (staging / "optimizer.pt").write_bytes(b"x" * 64)
    checkpoints.finalize(staging, root, {"format": "trainer"})


@pytest.mark.parametrize("keep,saves,existing", [(1, 5, 0), (2, 5, 0), (2, 1, 0), (None, 4, 0),
                                                 (1, 3, 2), (3, 3, 2), (2, 0, 1)])
def test_checkpoints_at_once_is_what_retention_leaves_at_its_peak(tmp_path, keep, saves,
                                                                  existing):
    peak = _peak_checkpoints(tmp_path, keep, saves, existing)
    assert preflight.checkpoints_at_once(keep, saves, existing) == peak


def test_unknown_number_of_saves_is_said_not_guessed():
    plan = _plan("cpu", "tiny")
    one = preflight.checkpoint_bytes(plan, TINY)
    kept_all, text = preflight.disk_needed(plan, TINY, keep=None, max_steps=None, save_steps=50)
    assert "not known ahead" in text
    bounded, _ = preflight.disk_needed(plan, TINY, keep=3, max_steps=None, save_steps=50)
    # keep 3 with the one being written: 3 more checkpoints than the single one counted above
    assert bounded - kept_all >= 3 * one


# --- free disk on real filesystems of a known size ----------------------------------------

def _in_tmpfs(tmp_path: Path, size: str, code: str) -> subprocess.CompletedProcess:
    """Run python `code` with argv[1] = a fresh tmpfs of `size` (conftest.in_tmpfs)."""
    mount = tmp_path / f"fs-{size}"
    mount.mkdir()
    return subprocess.run(in_tmpfs(mount, size, [sys.executable, "-c", code, str(mount)]),
                          capture_output=True, text=True, timeout=120)


_CHECK_TINY_RUN = """
import sys
from pathlib import Path
from ftlaunch.detect import hardware
from ftlaunch.models import presets as models
from ftlaunch.plan import planner
from ftlaunch.launch import preflight
from ftlaunch.errors import UserError
tiny = models.resolve("tiny")
plan = planner.plan(hardware.parse_spec("cpu"), tiny, planner.TrainSpec(seq_len=128,
                    global_batch_size=4, processes_per_node=1))
needed, breakdown = preflight.disk_needed(plan, tiny, keep=2, max_steps=12, save_steps=6)
try:
    preflight.check_disk(Path(sys.argv[1]) / "runs" / "not-yet", needed, breakdown)
except UserError as exc:
    print("REFUSED", exc)
else:
    print("OK", needed)
"""


def test_check_disk_refuses_a_filesystem_too_small_for_the_run(tmpfs_allowed, tmp_path):
    proc = _in_tmpfs(tmp_path, "256k", _CHECK_TINY_RUN)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("REFUSED"), proc.stdout
    # The message names what is free there (256 KiB) and what to do about it.
    assert "256.0 KiB free" in proc.stdout
    assert "save_total_limit" in proc.stdout and "--output-dir" in proc.stdout


def test_check_disk_accepts_a_filesystem_large_enough(tmpfs_allowed, tmp_path):
    proc = _in_tmpfs(tmp_path, "256m", _CHECK_TINY_RUN)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK"), proc.stdout


def test_check_disk_reads_the_space_left_now_not_the_size(tmpfs_allowed, tmp_path):
    code = """
import sys
from pathlib import Path
from ftlaunch.launch import preflight
from ftlaunch.errors import UserError
root = Path(sys.argv[1])
preflight.check_disk(root, 700 * 1024, "test")
(root / "filler").write_bytes(b"x" * 512 * 1024)
try:
    preflight.check_disk(root / "run", 700 * 1024, "test")
except UserError:
    print("REFUSED after filling")
"""
    proc = _in_tmpfs(tmp_path, "1m", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "REFUSED after filling"


# --- host RAM ----------------------------------------------------------------------------

def _plan(spec: str, model: str, **train) -> planner.Plan:
    return planner.plan(hardware.parse_spec(spec), models.resolve(model), TrainSpec(**train))


def _ram(plan: planner.Plan) -> int:
    return preflight.ram_needed(plan, models.resolve(plan.model_id))[0]


def test_check_ram_compares_with_what_is_available():
    plan = _plan("8xA100-80GB", "llama-3.1-8b")
    needed, breakdown = preflight.ram_needed(plan, models.resolve("llama-3.1-8b"))
    preflight.check_ram(needed, breakdown, available=needed)
    with pytest.raises(UserError) as refused:
        preflight.check_ram(needed, breakdown, available=needed // 2)
    message = str(refused.value)
    assert breakdown in message and "--gpus" in message
    # Without `available`: this machine's own memory, now.
    preflight.check_ram(1)
    with pytest.raises(UserError):
        preflight.check_ram(2 * psutil.virtual_memory().total)


def test_ram_grows_with_the_processes_that_each_load_the_base():
    plans = [_plan("8xA100-80GB", "llama-3.1-8b", processes_per_node=n) for n in (1, 2, 8)]
    assert [p.engine for p in plans] == ["single", "ddp", "ddp"]
    assert _ram(plans[0]) < _ram(plans[1]) < _ram(plans[2])
    # A bigger base on the same strategy needs more.
    assert _ram(_plan("8xA100-80GB", "qwen2.5-0.5b")) < _ram(plans[2])


def test_ram_is_lower_where_the_base_is_not_loaded_whole_by_every_process():
    lora_ddp = _plan("8xA100-80GB", "llama-3.1-8b", method="lora", engine="ddp")
    qlora_ddp = _plan("8xA100-80GB", "llama-3.1-8b", method="qlora", engine="ddp")
    fsdp = _plan("8xA100-80GB", "llama-3.1-8b", engine="fsdp")
    zero3 = _plan("8xA100-80GB", "llama-3.1-8b", engine="deepspeed")
    assert (lora_ddp.engine, qlora_ddp.method, fsdp.engine, zero3.zero_stage) == \
        ("ddp", "qlora", "fsdp", 3)
    assert _ram(qlora_ddp) < _ram(lora_ddp)
    assert _ram(fsdp) < _ram(lora_ddp) and _ram(zero3) < _ram(lora_ddp)


def test_offload_keeps_the_base_in_ram():
    offloaded = _plan("2xRTX4090-24GB", "llama-3.1-70b")
    assert offloaded.offload and offloaded.fits
    on_gpu = dataclasses.replace(offloaded, offload=False)
    # The node's share of the offloaded 4-bit 70B base: tens of GB.
    assert _ram(offloaded) - _ram(on_gpu) > 30 * 10**9


def test_cpu_ram_estimate_covers_the_real_worker(tiny_run):
    """tiny_run's worker logged its process's peak resident set, loading included
    (metrics.jsonl, CPU runs)."""
    _, run_dir = tiny_run
    plan = _tiny_run_plan(run_dir)
    if not plan.on_cpu:
        pytest.skip("tiny_run trained on a GPU: its peak memory is the GPU's")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    peak_rss = max(r["process_peak_memory_gib"] for r in rows if "peak_memory_gib" in r) * 2**30
    needed = _ram(plan)
    assert peak_rss <= needed <= 8 * peak_rss, (peak_rss, needed)


# --- versions ----------------------------------------------------------------------------

def test_runtime_versions_name_the_runtime_and_the_libraries():
    import torch

    versions = runtime.runtime_versions()
    assert set(versions) >= {"python", "ftlaunch", "torch", "torch_cuda", "nccl", "cudnn",
                             "gpu_driver", "executable", "transformers", "peft", "trl",
                             "accelerate", "datasets", "bitsandbytes", "deepspeed", "click",
                             "psutil"}
    assert versions["torch"] == torch.__version__
    assert versions["torch_cuda"] == torch.version.cuda
    assert versions["python"] == platform.python_version()
    assert versions["executable"] == sys.executable
    assert versions["transformers"] == metadata.version("transformers")
    json.dumps(versions)  # run.yaml and the checkpoint manifests store it as it is
    if torch.cuda.is_available():
        assert re.fullmatch(r"\d+\.\d+\.\d+", versions["nccl"] or "")
        assert versions["gpu_driver"]
    else:
        assert versions["nccl"] is None
    if shutil.which("nvidia-smi") is None:
        assert versions["gpu_driver"] is None


def test_a_snapshot_without_tokenizer_files_falls_back_to_the_estimate(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert preflight.tokenizer_bytes(tmp_path) is None
