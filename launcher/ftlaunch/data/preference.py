"""Preference pairs (DPO's data) tokenized as TRL 1.16's DPOTrainer tokenizes them
(`trl/trainer/dpo_trainer.py`, DPOTrainer._prepare_dataset, tokenize_fn):

    preference        prompt, prompt + chosen, prompt + rejected tokenized as text, EOS
                      appended to chosen and rejected unless they end with it
    chat_preference   the prompt through the chat template with the generation prompt,
                      prompt + chosen and prompt + rejected as whole conversations (no EOS:
                      the template ends the turn)

The completion starts where the tokenized prompt and the tokenized prompt + completion
diverge (the shorter of the two divergences), as TRL cuts it. What comes out is TRL's
own columns, prompt_ids, chosen_ids and rejected_ids: the launcher caches them
(data/cache.py) and the worker's DPOTrainer collates them as they are
(DataCollatorForPreference: prompt + chosen and prompt + rejected, the loss on the
completion's tokens). No torch here.
"""

from __future__ import annotations

from ftlaunch.data.formats import PREFERENCE_KINDS
from ftlaunch.data.tokenize import common_prefix_length

COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def tokenize_batch(batch: dict, indices: list[int], tokenizer, kind: str,
                   only_assistant: bool = True) -> dict:
    """{column: [values]} of canonical preference rows -> COLUMNS, and per pair the
    length of its longer sequence and the index of its first trained token (the prompt's
    length; -1 when a completion has no token of its own), as data.tokenize.tokenize_batch
    gives them for SFT."""
    assert kind in PREFERENCE_KINDS, kind
    if kind == "chat_preference":
        def encode(conversations, **kwargs):
            out = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True,
                                                **kwargs)
            return [list(ids) for ids in out["input_ids"]]

        prompts = encode(batch["prompt"], add_generation_prompt=True)
        chosen = encode([p + c for p, c in zip(batch["prompt"], batch["chosen"])])
        rejected = encode([p + r for p, r in zip(batch["prompt"], batch["rejected"])])
    else:
        eos = tokenizer.eos_token

        def encode(texts):
            return [list(ids) for ids in tokenizer(text=texts)["input_ids"]]

        def ended(texts):
            return [t if t.endswith(eos) else t + eos for t in texts]

        prompts = encode(batch["prompt"])
        chosen = encode([p + c for p, c in zip(batch["prompt"], ended(batch["chosen"]))])
        rejected = encode([p + r for p, r in zip(batch["prompt"], ended(batch["rejected"]))])
    out = {name: [] for name in (*COLUMNS, "_length", "_first_trained")}
    for prompt, full_chosen, full_rejected in zip(prompts, chosen, rejected):
        start = min(common_prefix_length(prompt, full_chosen),
                    common_prefix_length(prompt, full_rejected))
        out["prompt_ids"].append(prompt[:start])
        out["chosen_ids"].append(full_chosen[start:])
        out["rejected_ids"].append(full_rejected[start:])
        out["_length"].append(max(len(full_chosen), len(full_rejected)))
        trains = len(full_chosen) > start and len(full_rejected) > start
        out["_first_trained"].append(start if trains else -1)
    return out


def sequences(pair: dict) -> dict[str, tuple[list[int], list[bool]]]:
    """{"chosen", "rejected"}: the sequence DataCollatorForPreference builds from a
    tokenized pair (prompt + completion) and which of its tokens carry the loss."""
    prompt = list(pair["prompt_ids"])
    return {name: (prompt + list(pair[f"{name}_ids"]),
                   [False] * len(prompt) + [True] * len(pair[f"{name}_ids"]))
            for name in ("chosen", "rejected")}
