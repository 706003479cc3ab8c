"""What the model is trained to do, and what each objective is made of: the TRL config
its recipe's training section is checked against, the bundled recipe it starts from,
the data it trains on, and what one example costs in a step. Pure data, no torch.

    sft   supervised fine-tuning: TRL's SFTTrainer, the loss on what the data marks
    dpo   Direct Preference Optimization (Rafailov et al. 2023): TRL's DPOTrainer on
          prompt/chosen/rejected pairs; each pair is two sequences in the batch, and a
          reference model scores both (with LoRA: the base with the adapter disabled, or
          the starting adapter's frozen copy with --adapter)
    kto   Kahneman-Tversky Optimization (Ethayarajh et al. 2024): TRL's KTOTrainer on
          prompt/completion examples labelled desirable or not (pairs are unpaired: chosen
          desirable, rejected not); the reference scores each completion and a mismatched
          one (the KL estimate's: the batch's completions rotated by one), so a device's
          micro-batch holds at least two examples
ORPO is not offered: TRL 1.16 has it only in trl.experimental, with its own
tokenization and no stable API.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftlaunch.data.formats import PREFERENCE_KINDS, UNPAIRED_KINDS
from ftlaunch.errors import UserError


@dataclass(frozen=True)
class Objective:
    name: str
    fields: str  # its section in plan.config_fields (the config's fields and types)
    recipe: str  # the bundled recipe a run starts from when --recipe is not given
    kinds: tuple[str, ...]  # the canonical data kinds it trains on (data.formats)
    # Sequences one example puts in the batch: DPO's chosen and rejected go through the
    # model together (DataCollatorForPreference stacks them), so activations double.
    sequences_per_example: int
    # The Trainer's settings ftlaunch starts from, under a recipe's own.
    trainer_defaults: dict
    # Config fields ftlaunch runs this objective with one value: field -> (that value, why
    # another is refused).
    refused: dict
    # A frozen reference scores the batch (unless its log-probs are precomputed): forward
    # passes without gradients per training sequence. The trainer disables dropout.
    reference_forwards: int = 0
    # The policy's own forward passes without gradients per sequence (KTO's KL estimate).
    policy_forwards_without_grad: int = 0
    least_micro_batch: int = 1  # examples per device and micro-batch
    packs: bool = False  # examples may share a row (SFT's best-fit packing)
    data: str = "no preference data"  # what it trains on, as messages name it
    in_batch: str = ""  # what an example is in a step, as the plan table says it

    @property
    def config(self) -> str:
        """The TRL config class its Trainer takes (TRL names them so: SFTConfig, ...)."""
        return f"{self.name.upper()}Config"

    @property
    def has_reference(self) -> bool:
        return self.reference_forwards > 0


_COMMON_DEFAULTS = {"report_to": "none", "disable_tqdm": True, "save_strategy": "steps",
                    "dataloader_num_workers": 0,
                    # A NaN loss is logged as NaN, not as the average of the steps before it.
                    "logging_nan_inf_filter": False}
_NO_SYNC = ("a LoRA run's reference is the base with the adapter disabled (or the starting "
            "adapter's frozen copy), which TRL cannot sync (TR-DPO needs a full copy of the "
            "model)")

SFT = Objective(
    name="sft", fields="training", recipe="default",
    kinds=("conversational", "prompt_completion", "text"), sequences_per_example=1,
    trainer_defaults={"packing_strategy": "bfd", **_COMMON_DEFAULTS}, refused={}, packs=True)
DPO = Objective(
    name="dpo", fields="dpo_training", recipe="dpo",
    kinds=PREFERENCE_KINDS, sequences_per_example=2,
    trainer_defaults=dict(_COMMON_DEFAULTS), refused={"sync_ref_model": (False, _NO_SYNC)},
    reference_forwards=1, data="preference pairs",
    in_batch="the batch counts pairs, each two sequences (chosen, rejected)")
KTO = Objective(
    name="kto", fields="kto_training", recipe="kto",
    kinds=UNPAIRED_KINDS + PREFERENCE_KINDS, sequences_per_example=1,
    trainer_defaults=dict(_COMMON_DEFAULTS),
    refused={"sync_ref_model": (False, _NO_SYNC),
             "train_sampling_strategy": ("sequential", "the KL estimate pairs each "
                                         "completion with its neighbour's in a fixed order: "
                                         "ftlaunch shuffles the examples once with the run's "
                                         "seed and keeps that order (sequential)")},
    reference_forwards=2, policy_forwards_without_grad=1, least_micro_batch=2,
    data="completions labelled desirable or not",
    in_batch="the KL estimate scores each prompt with another completion of its micro-batch too")
OBJECTIVES = {objective.name: objective for objective in (SFT, DPO, KTO)}
CHOICES = ("auto", *OBJECTIVES)


def get(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise UserError(f"objective {name!r} is not one of {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[name]


def for_kind(kind: str) -> Objective:
    """What `--objective auto` trains data of this kind with."""
    if kind in PREFERENCE_KINDS:
        return DPO
    return KTO if kind in UNPAIRED_KINDS else SFT


def check_data(objective: Objective, kind: str, fmt: str, source) -> None:
    """The data is of a kind the objective trains on."""
    if kind in objective.kinds:
        return
    if objective is DPO:
        raise UserError(f"--objective dpo trains on preference pairs ({{prompt, chosen, "
                        f"rejected}} or {{chosen, rejected}}), but --data {source} holds "
                        f"{fmt} data. Give preference pairs"
                        + (", or --objective kto for these labelled completions."
                           if kind in UNPAIRED_KINDS else ", or --objective sft for this data."))
    if objective is KTO:
        raise UserError(f"--objective kto trains on completions labelled desirable or not "
                        f"({{prompt, completion, label}}) or on preference pairs, but --data "
                        f"{source} holds {fmt} data. Give such data, or --objective sft for "
                        "this data.")
    if kind in UNPAIRED_KINDS:
        raise UserError(f"--data {source} holds completions labelled desirable or not ({fmt}), "
                        f"which train with --objective kto, not --objective {objective.name}. "
                        "Leave --objective out (auto), or give data of another format for SFT.")
    raise UserError(f"--data {source} holds preference pairs ({fmt}), which train with "
                    f"--objective dpo or kto, not --objective {objective.name}. Leave "
                    "--objective out (auto), give data of another format for SFT, or, if its "
                    "rows also hold the conversation to train on, say which: --set "
                    "data.format=messages.")
