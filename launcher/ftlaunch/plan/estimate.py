"""How many steps and tokens a run will train, and roughly how long it will take,
before it starts.

Tokens are counted, not guessed, once the data is tokenized (the data cache knows
them). Time on a GPU is an arithmetic estimate, not a measurement: the FLOPs a LoRA
step does over the card's dense 16-bit peak at an assumed utilisation (MFU). It is
labelled as such wherever it is shown; the progress line replaces it with the
measured rate once steps run. Without a GPU there is no peak to divide by, so no
time is promised before the first steps.

Pure arithmetic: no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ftlaunch.detect.hardware import known_gpu
from ftlaunch.models.presets import ModelSpec
from ftlaunch.plan import objectives
from ftlaunch.plan.planner import Plan

# Dense bf16/fp16 tensor-core peak per GPU (TFLOP/s, vendor datasheets, without sparsity;
# SXM figures for H100/H200), for every GPU hardware._KNOWN_GPUS names (a test checks).
PEAK_TFLOPS = {"B200": 2250, "H200": 989, "H100": 989, "GH200": 989, "A100": 312, "A800": 312,
               "L40S": 362, "L40": 181, "RTX6000ADA": 364, "RTX4090": 165, "A6000": 155,
               "RTXA6000": 155, "RTX3090": 71, "A10G": 70, "A10": 125, "L4": 121,
               "V100": 125, "T4": 65}
# Fraction of that peak a LoRA fine-tune reaches in eager PyTorch (assumed, not measured
# here: docs/BENCHMARKS.md has no GPU rows yet). QLoRA dequantises every weight on
# every use, which costs more than its FLOPs show.
MFU = {"lora": 0.35, "qlora": 0.25}


@dataclass(frozen=True)
class RunSize:
    steps: int | None  # None: unknown (epochs over data not yet counted)
    tokens_per_step: int  # input tokens of one optimizer step, all processes
    tokens: int | None


def run_size(plan: Plan, max_steps: int | None, epochs: float | None,
             data_tokens: int | None = None, examples: int | None = None,
             packing: bool = True) -> RunSize:
    """Steps and input tokens. With packing a row is seq_len tokens (best-fit packing
    leaves little room); without it an example is its own row, at its own length. A DPO
    pair is two rows (chosen and rejected), each about as long as the pair's longer one."""
    rows_per_step = plan.global_batch_size * plan.sequences_per_example
    if packing or not (data_tokens and examples):
        tokens_per_step = rows_per_step * plan.seq_len
    else:
        tokens_per_step = round(rows_per_step * min(data_tokens / examples, plan.seq_len))
    by_epochs = not (max_steps and max_steps > 0)  # None or the recipes' -1: the epochs decide
    steps = None if by_epochs else max_steps
    if by_epochs and epochs and data_tokens and examples:
        rows = math.ceil(data_tokens / plan.seq_len) if packing else examples
        steps = math.ceil(epochs * rows / plan.global_batch_size)
    tokens = steps * tokens_per_step if steps else None
    if tokens and data_tokens and by_epochs:  # the last step of an epoch is not full
        tokens = min(tokens, round(epochs * data_tokens * plan.sequences_per_example))
    return RunSize(steps, tokens_per_step, tokens)


def flops_per_token(model: ModelSpec, plan: Plan) -> float:
    """LoRA training FLOPs per token: the forward (2N), the backward through the frozen
    weights to the activations (2N; no weight gradients but LoRA's few), the forward
    again under gradient checkpointing (2N), the forward passes without gradients the
    objective adds (2N each: DPO's reference; KTO's reference on the completion and on
    the KL completion, and the policy's own on the KL completion; the reference's
    unless its log-probs were precomputed), and causal attention (QK^T and AV, forward
    ~2·L·s·d, three times that with the backward)."""
    n = model.parameters
    objective = objectives.get(plan.objective)
    no_grad = (objective.policy_forwards_without_grad
               + (objective.reference_forwards if plan.reference_forward else 0))
    dense = (4 + (2 if plan.gradient_checkpointing else 0) + 2 * no_grad) * n
    attention = 6 * model.num_layers * plan.seq_len * model.num_heads * model.head_dim
    return dense + attention


def gpu_seconds(model: ModelSpec, plan: Plan, tokens: int) -> float | None:
    """The estimate in seconds, or None without a known GPU peak."""
    hw = plan.hardware
    if not hw.has_gpus:
        return None
    peak = PEAK_TFLOPS.get(known_gpu(hw.gpu.name))
    if peak is None:
        return None
    rate = peak * 1e12 * MFU[plan.method] * plan.num_processes
    return tokens * flops_per_token(model, plan) / rate


