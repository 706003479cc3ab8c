"""`ftlaunch generate`: a greedy reply from a finished run's adapter on its base model, or
from the base alone."""

from __future__ import annotations

from pathlib import Path

from ftlaunch.export.adapted import load_adapted


def generate(run_dir: Path, prompt: str, max_new_tokens: int = 48, with_adapter: bool = True) -> str:
    """The reply to one user message (the chat template applied where the tokenizer has
    one), decoded greedily, without the prompt and special tokens."""
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
