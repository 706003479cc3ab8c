"""What a finished run hands over: the adapter, applied to its base model for generation."""

from __future__ import annotations

from pathlib import Path

from ftlaunch import rundir
from ftlaunch.errors import UserError


def load_adapted(run_dir: Path, with_adapter: bool = True):
    """(model with adapter, tokenizer) from a finished run, on CPU or the first GPU.

    with_adapter=False gives the base model alone, to compare before and after."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not rundir.is_finished(run_dir):
        raise UserError(f"{run_dir} has no finished adapter yet (no {run_dir / 'adapter'}); "
                        "finish or resume the training first.")
    record = rundir.read_run_file(run_dir)
    model_info = record["model"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if model_info.get("random_init"):
        # The base was built from config with the run's seed; rebuild it the same way.
        torch.manual_seed(record["recipe"]["training"].get("seed", 42))
        base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model_info["config"]),
                                                dtype=dtype)
    else:
        base = AutoModelForCausalLM.from_pretrained(model_info["load_from"], dtype=dtype)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")) if with_adapter else base
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "adapter"))
    return model, tokenizer


def generate(run_dir: Path, prompt: str, max_new_tokens: int = 48, with_adapter: bool = True) -> str:
    import torch

    model, tokenizer = load_adapted(run_dir, with_adapter)
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
