"""What the model is trained to do, and what each objective is made of: the TRL config
its recipe's training section is checked against, the bundled recipe it starts from,
the data it trains on, and what one example becomes in a batch. Pure data, no torch.

    sft   supervised fine-tuning: TRL's SFTTrainer, the loss on what the data marks
    dpo   Direct Preference Optimization (Rafailov et al. 2023): TRL's DPOTrainer on
          prompt/chosen/rejected pairs; each pair is two sequences in the batch, and a
          reference model scores both (with LoRA: the base with the adapter disabled, or
          the starting adapter's frozen copy with --adapter)
"""

from __future__ import annotations

from dataclasses import dataclass

from ftlaunch.data.formats import PREFERENCE_KINDS
from ftlaunch.errors import UserError


@dataclass(frozen=True)
class Objective:
    name: str
    config: str  # the TRL config class its Trainer takes
    fields: str  # its section in plan.config_fields (the config's fields and types)
    recipe: str  # the bundled recipe a run starts from when --recipe is not given
    kinds: tuple[str, ...]  # the canonical data kinds it trains on (data.formats)
    # Sequences one example puts in the batch: DPO's chosen and rejected go through the
    # model together (DataCollatorForPreference stacks them), so activations double.
    sequences_per_example: int
    # The Trainer's settings ftlaunch starts from, under a recipe's own.
    trainer_defaults: dict
    # Config fields that contradict how ftlaunch runs this objective: field -> why.
    refused: dict


_COMMON_DEFAULTS = {"report_to": "none", "disable_tqdm": True, "save_strategy": "steps",
                    "dataloader_num_workers": 0,
                    # A NaN loss is logged as NaN, not as the average of the steps before it.
                    "logging_nan_inf_filter": False}

SFT = Objective(
    name="sft", config="SFTConfig", fields="training", recipe="default",
    kinds=("conversational", "prompt_completion", "text"), sequences_per_example=1,
    trainer_defaults={"packing_strategy": "bfd", **_COMMON_DEFAULTS}, refused={})
DPO = Objective(
    name="dpo", config="DPOConfig", fields="dpo_training", recipe="dpo",
    kinds=PREFERENCE_KINDS, sequences_per_example=2,
    trainer_defaults=dict(_COMMON_DEFAULTS),
    refused={"sync_ref_model": "a LoRA run's reference is the base with the adapter disabled "
                               "(or the starting adapter's frozen copy), which TRL cannot "
                               "sync (TR-DPO needs a full copy of the model)"})
OBJECTIVES = {objective.name: objective for objective in (SFT, DPO)}
CHOICES = ("auto", *OBJECTIVES)


def get(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise UserError(f"objective {name!r} is not one of {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[name]


def for_kind(kind: str) -> Objective:
    """What `--objective auto` trains data of this kind with."""
    return DPO if kind in PREFERENCE_KINDS else SFT


def check_data(objective: Objective, kind: str, fmt: str, source) -> None:
    """The data is of a kind the objective trains on."""
    if kind in objective.kinds:
        return
    if objective is DPO:
        raise UserError(f"--objective dpo trains on preference pairs ({{prompt, chosen, "
                        f"rejected}} or {{chosen, rejected}}), but --data {source} holds "
                        f"{fmt} data. Give preference data, or --objective sft for this data.")
    raise UserError(f"--data {source} holds preference pairs ({fmt}), which train with "
                    f"--objective dpo, not --objective {objective.name}. Leave --objective "
                    "out (auto), give data of another format for SFT, or, if its rows also "
                    "hold the conversation to train on, say which: --set "
                    "data.format=messages.")
