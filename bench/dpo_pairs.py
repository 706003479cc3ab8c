"""How often a model prefers the chosen answer, on a DPO (or KTO) run's held-out pairs.

For each pair of the run's held-out split (its data cache's eval split: the very pairs
the run evaluated on), the summed log-probability of the chosen completion and of the
rejected one, given the prompt; a pair counts as preferred when chosen's is higher.
Measured for the base model, the run's starting adapter (--adapter: the SFT step) and the
run's trained adapter, so the figure says what the DPO step changed. (TRL's own eval
reward accuracy compares each model with its reference, the starting adapter: it is 0
before the first step by construction, which says nothing about the starting model.)

    .venv/bin/python bench/dpo_pairs.py runs/demo-dpo        # prints one JSON object

A KTO run trained on pairs holds them unpaired (data.formats.unpair: per block of pairs,
the chosen examples, then the rejected ones), and its held-out split is read back as
those pairs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def completion_logps(model, pairs, name: str) -> list[float]:
    import torch

    out = []
    with torch.no_grad():
        for pair in pairs:
            prompt, completion = list(pair["prompt_ids"]), list(pair[f"{name}_ids"])
            ids = torch.tensor([prompt + completion])
            logits = model(input_ids=ids).logits[0, :-1].float()
            picked = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            out.append(float(picked[len(prompt) - 1:].sum()))
    return out


def preferred(model, pairs) -> dict:
    chosen = completion_logps(model, pairs, "chosen")
    rejected = completion_logps(model, pairs, "rejected")
    wins = sum(c > r for c, r in zip(chosen, rejected))
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(pairs)
    return {"preferred": round(wins / len(pairs), 4), "mean_logp_margin": round(margin, 4)}


def main(run_dir: Path) -> dict:
    from peft import PeftModel

    from ftlaunch.data import cache as data_cache
    from ftlaunch.models.adapter import START_FOLDER
    from ftlaunch.models.load import load_base_model, precision_dtype
    from ftlaunch.run import record as run_record

    record = run_record.load(run_dir)
    _, held_out = data_cache.load(run_dir / data_cache.DIRECTORY, record.data.cache["fingerprint"])
    if held_out is None:
        raise SystemExit(f"{run_dir} held no pairs out (data.eval_split or --eval-data)")
    if "completion_ids" in held_out.column_names:
        held_out = _pairs_again(held_out.to_list(), run_dir)
    dtype = precision_dtype(record.strategy.precision)
    step = record.strategy.objective.upper()
    models = {"base": None}
    if record.strategy.start_adapter:
        models[f"start adapter (before {step})"] = run_dir / START_FOLDER
    models[f"trained adapter (after {step})"] = run_dir / "adapter"
    result = {"run": str(run_dir), "pairs": len(held_out), "date": time.strftime("%Y-%m-%d")}
    for label, adapter in models.items():
        model = load_base_model(record.model, dtype, seed=record.seed).eval()
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter)).eval()
        result[label] = preferred(model, held_out)
    return result


def _pairs_again(examples: list[dict], run_dir: Path) -> list[dict]:
    """KTO's unpaired held-out examples as the pairs they were unpaired from."""
    from ftlaunch.data.formats import UNPAIR_BLOCK

    pairs = []
    for start in range(0, len(examples), 2 * UNPAIR_BLOCK):
        block = examples[start:start + 2 * UNPAIR_BLOCK]
        half = len(block) // 2
        for chosen, rejected in zip(block[:half], block[half:]):
            if not (chosen["label"] and not rejected["label"]
                    and chosen["prompt_ids"] == rejected["prompt_ids"]):
                raise SystemExit(f"{run_dir}'s held-out examples were not unpaired from pairs")
            pairs.append({"prompt_ids": chosen["prompt_ids"],
                          "chosen_ids": chosen["completion_ids"],
                          "rejected_ids": rejected["completion_ids"]})
    return pairs


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
