"""The baseline of bench/cpu_vs_trl.py: a plain LoRA fine-tuning script, as the TRL
tutorials write it (transformers + peft + trl directly, no ftlaunch): on CPU for
bench/cpu_vs_trl.py, on a GPU (--device cuda --precision bf16 [--qlora]) for bench/gpu.py.

    .venv/bin/python bench/plain_sft.py MODEL_DIR DATA.jsonl --steps 20 --batch 8 \
        --seq-len 128 --seed 42 --lr 1e-3 --out /tmp/plain [--chat-template T.jinja] \
        [--gradient-checkpointing default|on|off] [--optim NAME]

What a tutorial sets is set (model, data, LoRA shape, batch, steps, learning-rate schedule,
max_length, seed, logging); everything else is TRL's default, unless a flag says otherwise.
Two settings a CPU user must change are changed: use_cpu=True and bf16=False (SFTConfig
defaults to bf16, which on CPU is emulated and many times slower), and the model is loaded
in fp32 (transformers 5 loads a bf16 checkpoint as bf16 by default). assistant_only_loss is
on, with a chat template whose {% generation %} markers say which tokens the assistant
wrote (--chat-template, for models whose own template has none), so the loss is on the
same tokens as ftlaunch's.

The only additions to the tutorial script are measurements, marked as such: a wrapper
around the collator that counts the tokens with a label in every batch and hashes the
batches' input ids the way ftlaunch's workers do (so the two runs can be shown to have
trained on the same batches), timestamps of each phase, and a JSON result (--result,
default OUT/result.json).
"""

from __future__ import annotations

import time

T_IMPORT = time.time()  # measurement: when this file started running

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
from pathlib import Path  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a local model folder (from_pretrained)")
    p.add_argument("data", help="a .jsonl file of {'messages': [...]} or {'text': ...} rows")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, default=8, help="per-device batch (accumulation 1)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-scheduler", default="cosine")
    p.add_argument("--warmup", type=float, default=0.05, help="warmup_steps (< 1: a ratio)")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--logging-steps", type=int, default=5)
    p.add_argument("--save-steps", type=int, default=500)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--chat-template", default=None,
                   help="a .jinja chat template with generation markers (SFTConfig.chat_template_path)")
    p.add_argument("--gradient-checkpointing", choices=("default", "on", "off"), default="default",
                   help="default: TRL's (on)")
    p.add_argument("--optim", default=None, help="default: TRL's (adamw_torch_fused)")
    p.add_argument("--packing", choices=("default", "on", "off"), default="default",
                   help="default: TRL's (off)")
    p.add_argument("--result", type=Path, default=None)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="the weights' and the training's dtype (a CPU user must stay in fp32)")
    p.add_argument("--qlora", action="store_true",
                   help="a 4-bit NF4 base (bitsandbytes), as the QLoRA tutorials load it")
    p.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps")
    return p.parse_args(argv)


def recipe_flags(recipe: dict, plan: dict, steps: int) -> list[str]:
    """This script's flags for what an ftlaunch recipe (Recipe.to_json()) and its plan
    train: hyper-parameters, LoRA shape, micro-batch, accumulation, seq len, seed. The
    benches add what they vary (device, checkpointing, optimizer, packing)."""
    training, lora = recipe["training"], recipe["lora"]
    if lora.get("target_modules") != "all-linear" or lora.get("bias", "none") != "none":
        raise SystemExit("plain_sft.py trains all linear layers without bias: so must the recipe")
    if plan["num_processes"] != 1:
        raise SystemExit("plain_sft.py runs one process: so must the plan")
    return ["--steps", str(steps), "--batch", str(plan["per_device_batch_size"]),
            "--accumulation", str(plan["gradient_accumulation_steps"]),
            "--seq-len", str(plan["seq_len"]), "--seed", str(training.get("seed", 42)),
            "--lr", str(training["learning_rate"]),
            "--lr-scheduler", str(training["lr_scheduler_type"]),
            "--warmup", str(training.get("warmup_steps", 0)),
            "--max-grad-norm", str(training.get("max_grad_norm", 1.0)),
            "--weight-decay", str(training.get("weight_decay", 0.0)),
            "--logging-steps", str(int(training["logging_steps"])),
            "--lora-r", str(lora["r"]), "--lora-alpha", str(lora["lora_alpha"]),
            "--lora-dropout", str(lora["lora_dropout"])]


class CountingCollator:
    """Measurement only: per collated batch, the tokens with a label (the ones the loss is
    on) and all input ids, and a SHA-256 of the input ids in order, as ftlaunch's
    BatchRecorder (ftlaunch.worker.callbacks) computes it. The dataloader collates one
    batch ahead of the step that uses it, so the trained tokens are summed over the first
    global_step batches only."""

    def __init__(self, collator):
        self.collator = collator
        self.trained: list[int] = []
        self.tokens = 0
        self.digest = hashlib.sha256()

    def __call__(self, features):
        batch = self.collator(features)
        ids = batch["input_ids"]
        self.digest.update(ids.cpu().numpy().tobytes())
        self.tokens += int(ids.numel())
        self.trained.append(int((batch["labels"] != -100).sum()))
        return batch


def process_start_time() -> float:
    """When this process was created (the interpreter's own start-up counts too)."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - measurement only
        return T_IMPORT


def main(argv=None) -> None:
    args = parse_args(argv)
    marks = {"process_start": process_start_time(), "script_start": T_IMPORT}

    # ---------------------------------------------------------------- the tutorial
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    marks["imported"] = time.time()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    load = {"dtype": dtype}
    if args.qlora:
        from transformers import BitsAndBytesConfig

        load["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, **load)
    marks["model_loaded"] = time.time()
    dataset = load_dataset("json", data_files=args.data, split="train")
    marks["data_loaded"] = time.time()

    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    optional = {}
    if args.gradient_checkpointing != "default":
        optional["gradient_checkpointing"] = args.gradient_checkpointing == "on"
    if args.optim:
        optional["optim"] = args.optim
    if args.packing != "default":
        optional["packing"] = args.packing == "on"
    if args.chat_template:
        optional["chat_template_path"] = args.chat_template
    config = SFTConfig(
        output_dir=str(args.out / "checkpoints"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accumulation,
        learning_rate=args.lr,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup,
        max_grad_norm=args.max_grad_norm,
        weight_decay=args.weight_decay,
        max_length=args.seq_len,
        seed=args.seed,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        # Conversations train on the assistant's turns; plain text on all of it.
        assistant_only_loss="messages" in dataset.column_names,
        use_cpu=args.device == "cpu",
        bf16=args.precision == "bf16",
        fp16=args.precision == "fp16",
        report_to="none",
        **optional,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=lora)
    marks["trainer_built"] = time.time()

    counter = CountingCollator(trainer.data_collator)  # measurement
    trainer.data_collator = counter
    started = marks["train_start"] = time.time()
    result = trainer.train()
    train_seconds = time.time() - started  # measurement
    marks["trained"] = time.time()
    trainer.save_model(str(args.out / "adapter"))
    marks["saved"] = time.time()
    # ---------------------------------------------------------------- measurements

    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    steps_done = trainer.state.global_step * config.gradient_accumulation_steps
    trained_tokens = sum(counter.trained[:steps_done])
    out = {
        "global_step": trainer.state.global_step,
        "batches": len(counter.trained),
        "tokens": counter.tokens,
        "trained_tokens": trained_tokens,
        "data_digest": counter.digest.hexdigest(),
        "train_seconds": round(train_seconds, 3),
        "trained_tokens_per_s": round(trained_tokens / train_seconds, 1),
        "final_loss": losses[-1] if losses else None,
        "train_loss": result.training_loss,
        "wall_seconds_in_process": round(time.time() - marks["process_start"], 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        **({"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}
           if args.device == "cuda" else {}),
        "phases_s": {name: round(marks[name] - marks["process_start"], 3)
                     for name in marks if name != "process_start"},
        "marks_epoch": marks,
        "settings": {"gradient_checkpointing": bool(config.gradient_checkpointing),
                     "optim": getattr(config.optim, "value", str(config.optim)), "packing": bool(config.packing),
                     "padding_free": bool(config.padding_free), "bf16": bool(config.bf16),
                     "dtype": str(next(model.parameters()).dtype),
                     "torch_threads": torch.get_num_threads(),
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
    }
    path = args.result or args.out / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: out[k] for k in ("trained_tokens_per_s", "train_seconds", "final_loss")}))


if __name__ == "__main__":
    main()
