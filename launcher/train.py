"""The shared SFT module every strategy launches: `python -m ftlaunch.train --run-dir DIR`.

It is the only place that touches the Trainer. Everything it needs was
decided and validated by the launcher and written to run.yaml; a worker only
reads it, so all ranks train the same thing and no rank can disagree about
the plan. Rank 0 writes the run files; every rank writes one line about
itself in ranks/, which is how tests see that all ranks trained together.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from ftlaunch import data as data_io
from ftlaunch import rundir
from ftlaunch.quiet import silence_library_noise
from ftlaunch.errors import USER_ERROR_EXIT, UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftlaunch.train")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--resume-from", type=Path, default=None)
    args = parser.parse_args(argv)
    silence_library_noise()
    try:
        run(args.run_dir.resolve(), args.resume_from)
    except UserError as exc:
        print(f"ftlaunch: {exc}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    return 0


def run(run_dir: Path, resume_from: Path | None) -> None:
    record = rundir.read_run_file(run_dir)
    plan, recipe, model_info = record["plan"], record["recipe"], record["model"]
    on_cpu = plan["engine"] == "cpu"
    # The training arguments come before the model: under DeepSpeed ZeRO-3 they are what
    # makes from_pretrained build the model already partitioned (zero.Init).
    config = _training_config(run_dir, plan, recipe, record["data"]["format"], on_cpu)
    tokenizer = _load_tokenizer(model_info["tokenizer"])
    model = _load_model(model_info, plan, recipe, on_cpu)
    dataset = _load_dataset(record["data"], recipe)
    trainer = _build_trainer(run_dir, config, recipe, model, tokenizer, dataset)
    recorder = _BatchRecorder(trainer.data_collator)
    trainer.data_collator = recorder

    if resume_from is not None and trainer.is_world_process_zero():
        _trim_metrics(run_dir / "metrics.jsonl", _checkpoint_step(resume_from))
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    _write_rank_report(run_dir, trainer, recorder, result, time.time() - started)
    _save_adapter(trainer, tokenizer, run_dir / "adapter")
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        print(f"ftlaunch: training finished, adapter in {run_dir / 'adapter'}", flush=True)


def _load_tokenizer(source: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(model_info: dict, plan: dict, recipe: dict, on_cpu: bool):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan["precision"],
                                                                         torch.float32)
    kwargs: dict = {"dtype": compute_dtype}
    if plan["method"] == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            # FSDP can only shard the packed 4-bit weights if they are stored in
            # the same dtype as everything else it flattens.
            bnb_4bit_quant_storage=compute_dtype,
        )
    if model_info.get("random_init"):
        torch.manual_seed(recipe["training"].get("seed", 42))
        config = AutoConfig.for_model(**model_info["config"])
        if plan["method"] == "qlora":
            raise UserError("--random-init with QLoRA is not supported yet: quantisation needs "
                            "saved weights. Use --method lora with --random-init.")
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(model_info["load_from"], **kwargs)
        except OSError as exc:
            raise UserError(f"Cannot load model {model_info['load_from']}: {exc}") from None
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if plan["method"] == "qlora" and plan["engine"] not in ("fsdp", "deepspeed"):
        # PEFT's preparation keeps norms and embeddings in fp32 for stability (the memory
        # model counts it). Sharded QLoRA skips it: FSDP/ZeRO-3 flatten parameters into
        # one dtype, which is why bnb_4bit_quant_storage is the compute dtype.
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=plan["gradient_checkpointing"],
            gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _load_dataset(data_record: dict, recipe: dict):
    from datasets import Dataset

    loaded = data_io.load(Path(data_record["path"]), data_record["format"],
                          recipe["data"].get("system_prompt"))
    if loaded.fingerprint != data_record["fingerprint"]:
        raise UserError(f"{data_record['path']} changed after the launcher read it; re-run the "
                        "command so the run records the data it actually trains on.")
    return Dataset.from_list(list(loaded.rows))


def _training_config(run_dir, plan, recipe, data_format, on_cpu):
    from trl import SFTConfig

    training = dict(recipe["training"])
    # transformers 5.2x renamed gradient_checkpointing; older 5.x only has the old name.
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    training[f"{prefix}_checkpointing"] = plan["gradient_checkpointing"]
    training[f"{prefix}_checkpointing_kwargs"] = {"use_reentrant": False}
    config = SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=plan["per_device_batch_size"],
        gradient_accumulation_steps=plan["gradient_accumulation_steps"],
        max_length=plan["seq_len"],
        use_cpu=on_cpu,
        bf16=plan["precision"] == "bf16",
        fp16=plan["precision"] == "fp16",
        assistant_only_loss=data_format == "messages",
        packing=False,
        report_to=[],
        disable_tqdm=True,
        save_strategy="steps",
        ddp_find_unused_parameters=False if plan["num_processes"] > 1 else None,
        ddp_backend=_ddp_backend(plan),
        dataloader_num_workers=0,
        **training,
    )
    return config


def _ddp_backend(plan: dict) -> str | None:
    """DeepSpeed without a GPU needs the backend named: accelerate only works it out for
    CUDA, and without one it would count a single process (and the Trainer's batch
    arithmetic would disagree with ds_config.json)."""
    if plan["engine"] == "deepspeed" and not plan["hardware"]["gpus_per_node"]:
        return "gloo"
    return None


def _build_trainer(run_dir, config, recipe, model, tokenizer, dataset):
    from peft import LoraConfig
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTTrainer

    lora = LoraConfig(task_type="CAUSAL_LM", **recipe["lora"])

    class MetricsCallback(TrainerCallback):
        """metrics.jsonl on rank 0, one line per logged step, and a readable line on stdout."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            row = {"step": state.global_step, "time": round(time.time(), 3)}
            row.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}  "
                  f"lr {logs.get('learning_rate', 0):.2e}", flush=True)

    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=lora,
                         callbacks=[MetricsCallback()])
    trainer.remove_callback(PrinterCallback)  # MetricsCallback prints one readable line instead
    return trainer


class _BatchRecorder:
    """Wraps the collator to fingerprint the batches this rank trained on."""

    def __init__(self, collator):
        self.collator = collator
        self.digest = hashlib.sha256()
        self.batches = 0
        self.tokens = 0

    def __call__(self, features):
        batch = self.collator(features)
        ids = batch["input_ids"]
        self.digest.update(ids.cpu().numpy().tobytes())
        self.batches += 1
        self.tokens += int(ids.numel())
        return batch


def _adapter_checksum(trainer) -> str:
    """A digest of the trained adapter, the same on every rank when the ranks agree.

    Collective under ZeRO-3 and FSDP (every rank must call it): ZeRO-3 partitions the
    LoRA weights, so they are gathered first (only the trainable ones, a few MB); FSDP
    keeps each rank's shard of them, so the shards' digests are gathered and hashed in
    rank order.
    """
    model = trainer.model
    trainable = [(n, p) for n, p in sorted(model.named_parameters()) if p.requires_grad]
    if trainer.is_deepspeed_enabled and any(hasattr(p, "ds_id") for _, p in trainable):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
            return _digest(trainable)
    if trainer.is_fsdp_enabled and trainer.args.world_size > 1:
        import torch.distributed as dist

        shards: list = [None] * trainer.args.world_size
        dist.all_gather_object(shards, _digest(trainable))
        return hashlib.sha256("".join(shards).encode()).hexdigest()
    return _digest(trainable)


def _digest(named_params) -> str:
    digest = hashlib.sha256()
    for name, param in named_params:
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _write_rank_report(run_dir, trainer, recorder, result, seconds):
    import torch.distributed as dist

    state = trainer.state
    report = {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
        "pid": os.getpid(),
        "global_step": state.global_step,
        "batches": recorder.batches,
        "tokens": recorder.tokens,
        "data_digest": recorder.digest.hexdigest(),
        "adapter_checksum": _adapter_checksum(trainer),
        "train_loss": result.training_loss,
        "seconds": round(seconds, 2),
    }
    ranks = run_dir / "ranks"
    ranks.mkdir(exist_ok=True)
    (ranks / f"rank-{report['rank']}.json").write_text(json.dumps(report) + "\n", encoding="utf-8")


def _save_adapter(trainer, tokenizer, target: Path) -> None:
    """Every rank calls this; rank 0 writes.

    Written beside and renamed: a run counts as finished only when adapter/ is whole.
    Sharded engines go through the Trainer's save_model, on every rank, because
    collecting the adapter is collective there: ZeRO-3 gathers the trainable weights
    (stage3_gather_16bit_weights_on_model_save), FSDP needs a full state dict
    (checkpoints are SHARDED_STATE_DICT; the adapter file must be whole).
    """
    staging = target.with_name(".adapter.tmp")
    main = trainer.is_world_process_zero()
    zero3 = trainer.is_deepspeed_enabled and any(
        hasattr(p, "ds_id") for p in trainer.model.parameters())
    if trainer.is_fsdp_enabled or zero3:
        if trainer.is_fsdp_enabled:
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(staging))
        if main:
            (staging / "training_args.bin").unlink(missing_ok=True)
    elif main:
        trainer.model.save_pretrained(staging)
    if not main:
        return
    tokenizer.save_pretrained(staging)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    staging.rename(target)


def _checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[-1])


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint: those steps run again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
