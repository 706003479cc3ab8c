"""DeepSpeed ZeRO-2 and ZeRO-3 for real: 2 CPU processes through accelerate launch.

The planner sends a machine without GPUs to engine "cpu" (DDP over gloo), so the
plan is taken from it and given engine deepspeed here; everything after that is
the real path: start.train renders accelerate.yaml + ds_config.json, accelerate
launches DeepSpeed's engine (CPU accelerator, gloo), the Trainer trains and the
adapter is saved. The first launch JIT-compiles DeepSpeed's shm comm op (~35 s).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")


@pytest.mark.parametrize("stage", [2, 3])
def test_two_cpu_processes_train_with_deepspeed(stage, tmp_path, monkeypatch, capsys):
    from ftlaunch import job as job_mod
    from ftlaunch import render, start

    if stage == 3:
        # DeepSpeed leaves parameters under this many elements whole on every rank; the
        # tiny model's LoRA matrices are far smaller. 0 partitions them too, so the test
        # sees the adapter gathered for the checksum and for saving.
        monkeypatch.setattr(render, "_PERSISTENCE_THRESHOLD", 0)
    run_dir = tmp_path / "run"
    options = job_mod.Options(model="tiny", gpus="2", max_steps=4, seq_len=128,
                              global_batch_size=8, sets=("logging_steps=2", "save_steps=2"),
                              output_dir=str(run_dir))
    job = job_mod.resolve(options)
    assert not job.plan.hardware.has_gpus and job.plan.num_processes == 2
    plan = dataclasses.replace(job.plan, engine="deepspeed", zero_stage=stage)
    job = dataclasses.replace(job, plan=plan)

    code = start.train(job, ["--model", "tiny"], print)
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]

    config = load_config_from_file(str(run_dir / "accelerate.yaml"))
    assert str(config.distributed_type).endswith("DEEPSPEED")
    assert config.num_processes == 2
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == plan.per_device_batch_size * \
        plan.gradient_accumulation_steps * 2 == 8

    ranks = [json.loads((run_dir / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["global_step"] == 4 for r in ranks)
    assert ranks[0]["data_digest"] != ranks[1]["data_digest"]
    assert ranks[0]["adapter_checksum"] == ranks[1]["adapter_checksum"]

    # DeepSpeed's engine did the training: its checkpoint holds one optimizer partition
    # per rank (ZeRO-3: model partitions too).
    step_dir = run_dir / "checkpoints" / "checkpoint-2" / "global_step2"
    assert sorted(p.name for p in step_dir.glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    # The disk preflight's estimate of one checkpoint covers this real one (within 25 %),
    # and what it relies on holds: DeepSpeed's files carry no frozen base weight except,
    # on ZeRO-2, the tied lm_head.
    import torch

    from ftlaunch import preflight

    checkpoint = step_dir.parent
    measured = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    tokenizer = preflight.tokenizer_bytes(
        yaml.safe_load((run_dir / "run.yaml").read_text())["model"]["tokenizer"])
    estimate = preflight.checkpoint_bytes(plan, job.model, tokenizer)
    assert measured <= estimate <= 1.25 * measured, (estimate, measured)
    modules = [torch.load(f, map_location="cpu", weights_only=False)["module"]
               for f in sorted(step_dir.glob("*model_states.pt"))]
    if stage == 2:
        [module] = modules
        assert {name for name in module if ".lora_" not in name} == {
            "base_model.model.lm_head.weight"}  # tied to embed_tokens
        assert job.model.tie_word_embeddings
    else:
        assert len(modules) == 2 and all(t.numel() == 0 for m in modules for t in m.values())

    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "tokenizer_config.json").is_file()
    from safetensors.torch import load_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    rank = yaml.safe_load((run_dir / "run.yaml").read_text())["recipe"]["lora"]["r"]
    assert weights and all(t.numel() > 0 for t in weights.values())
    assert all(rank in t.shape for t in weights.values())  # whole, not a ZeRO-3 partition
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]

    # The same run killed after its step-2 checkpoint resumes through DeepSpeed's own
    # checkpoint loading (partitioned optimizer state, and ZeRO-3 partitioned weights)
    # and ends where the uninterrupted run ended.
    import shutil

    first = json.loads((run_dir / "ranks" / "rank-0.json").read_text())["adapter_checksum"]
    shutil.rmtree(run_dir / "adapter")
    shutil.rmtree(run_dir / "ranks")
    code = start.train(job, ["--model", "tiny"], print)
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    assert f"resuming {run_dir} from checkpoint-2" in out
    ranks = [json.loads((run_dir / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert all(r["global_step"] == 4 for r in ranks)
    assert ranks[0]["adapter_checksum"] == ranks[1]["adapter_checksum"] == first
