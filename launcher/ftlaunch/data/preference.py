"""Preference pairs (DPO's data) tokenized as TRL 1.16's DPOTrainer tokenizes them
(`trl/trainer/dpo_trainer.py`, DPOTrainer._prepare_dataset, tokenize_fn), and unpaired
examples (KTO's) as its KTOTrainer does (`trl/trainer/kto_trainer.py`, the same steps
for one completion):

    preference        prompt, prompt + chosen, prompt + rejected tokenized as text, EOS
                      appended to chosen and rejected unless they end with it
    chat_preference   the prompt through the chat template with the generation prompt,
                      prompt + chosen and prompt + rejected as whole conversations (no EOS:
                      the template ends the turn)

The completion starts where the tokenized prompt and the tokenized prompt + completion
diverge (the shorter of the two divergences), as TRL cuts it. What comes out is TRL's
own columns, prompt_ids, chosen_ids and rejected_ids (KTO: prompt_ids, completion_ids,
label): the launcher caches them (data/cache.py) and the worker's trainer collates them
as they are (DataCollatorForPreference: prompt + chosen and prompt + rejected;
DataCollatorForUnpairedPreference: prompt + completion; the loss on the completion's
tokens). No torch here.
"""

from __future__ import annotations

from ftlaunch.data.formats import CHAT_KINDS, PREFERENCE_KINDS, UNPAIRED_KINDS
from ftlaunch.data.tokenize import common_prefix_length

COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
UNPAIRED_COLUMNS = ("prompt_ids", "completion_ids", "label")


def tokenize_batch(batch: dict, indices: list[int], tokenizer, kind: str,
                   only_assistant: bool = True) -> dict:
    """{column: [values]} of canonical preference rows -> COLUMNS (unpaired rows ->
    UNPAIRED_COLUMNS), and per example the length of its longer sequence and the index of
    its first trained token (the prompt's length; -1 when a completion has no token of its
    own), as data.tokenize.tokenize_batch gives them for SFT."""
    if kind in UNPAIRED_KINDS:
        return _tokenize_unpaired(batch, tokenizer, kind)
    assert kind in PREFERENCE_KINDS, kind
    prompts, chosen, rejected = _encode(tokenizer, kind, batch["prompt"],
                                        batch["chosen"], batch["rejected"])
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


def _tokenize_unpaired(batch: dict, tokenizer, kind: str) -> dict:
    prompts, completions = _encode(tokenizer, kind, batch["prompt"], batch["completion"])
    out = {name: [] for name in (*UNPAIRED_COLUMNS, "_length", "_first_trained")}
    for prompt, full, label in zip(prompts, completions, batch["label"]):
        start = common_prefix_length(prompt, full)
        out["prompt_ids"].append(prompt[:start])
        out["completion_ids"].append(full[start:])
        out["label"].append(bool(label))
        out["_length"].append(len(full))
        out["_first_trained"].append(start if len(full) > start else -1)
    return out


def _encode(tokenizer, kind: str, prompts: list, *answers: list) -> list[list[list[int]]]:
    """[prompt ids, prompt + answer ids for each list of answers]: conversations through
    the chat template (the prompt with the generation prompt), text with EOS appended to
    each answer that does not end with it."""
    if kind in CHAT_KINDS:
        def encode(conversations, **kwargs):
            out = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True,
                                                **kwargs)
            return [list(ids) for ids in out["input_ids"]]

        return [encode(prompts, add_generation_prompt=True),
                *(encode([p + a for p, a in zip(prompts, texts)]) for texts in answers)]
    eos = tokenizer.eos_token

    def encode(texts):
        return [list(ids) for ids in tokenizer(text=texts)["input_ids"]]

    return [encode(prompts),
            *(encode([p + (a if a.endswith(eos) else a + eos) for p, a in zip(prompts, texts)])
              for texts in answers)]


def columns(kind: str) -> tuple[str, ...]:
    return UNPAIRED_COLUMNS if kind in UNPAIRED_KINDS else COLUMNS


def sequences(example: dict) -> dict[str, tuple[list[int], list[bool]]]:
    """{"chosen", "rejected"} of a tokenized pair, {"completion"} of an unpaired example:
    the sequence TRL's collator builds (prompt + completion) and which of its tokens carry
    the loss."""
    prompt = list(example["prompt_ids"])
    names = ("completion",) if "completion_ids" in example else ("chosen", "rejected")
    return {name: (prompt + list(example[f"{name}_ids"]),
                   [False] * len(prompt) + [True] * len(example[f"{name}_ids"]))
            for name in names}
