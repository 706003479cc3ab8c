"""The memory model against published measurements, and its own invariants.

Back-test source: torchtune's README, "Memory and training speed" table
(github.com/pytorch/torchtune, README.md at commit 0031bfb): Llama 3.1 8B on one
RTX 4090, batch size 2 without gradient accumulation, packed sequence length 2048,
torch.compile on; peak memory per GPU 7.4 GiB for QLoRA, 16.2 GiB for LoRA. The
recipes behind it (recipes/configs/llama3_1/8B_{lora,qlora}_single_device.yaml):
LoRA rank 8 on q_proj, v_proj, output_proj and the MLP, dropout 0.0, activation
checkpointing on, bf16 weights and adapters, CEWithChunkedOutputLoss (8 chunks).
torchtune reports torch.cuda allocator peaks, so the comparison is with
Breakdown.allocated (the CUDA context is not in the allocator).
"""

from __future__ import annotations

import pytest

from ftlaunch import hardware, memory, models, planner
from ftlaunch.planner import Candidate, TrainSpec

# torchtune's stack as its recipes configure it: bf16 LoRA weights, gradients and
# AdamW moments (2 + 2 + 4 bytes), an 8-chunk fp32 loss, compiled model.
TORCHTUNE = memory.Stack(adapter_bytes=2, optimizer_bytes=4, loss_chunks=8, compiled=True,
                         kbit_upcast=False)
TORCHTUNE_LORA = TrainSpec(seq_len=2048, lora_rank=8, lora_dropout=0.0,
                           lora_targets=("q_proj", "v_proj", "o_proj",
                                         "gate_proj", "up_proj", "down_proj"))


@pytest.mark.parametrize("method, published_gib", [("qlora", 7.4), ("lora", 16.2)])
def test_llama_8b_single_4090_matches_torchtune_within_15_percent(method, published_gib):
    spec = models.resolve("llama-3.1-8b")
    mem = memory.estimate(spec, TORCHTUNE_LORA, Candidate(method, "single"), micro_batch=2,
                          world=1, on_gpu=True, gradient_checkpointing=True, stack=TORCHTUNE)
    predicted = mem.allocated / memory.GIB
    assert abs(predicted - published_gib) / published_gib <= 0.15, (predicted, mem)


def test_terms_add_up_to_the_peak():
    spec = models.resolve("qwen2.5-7b")
    for checkpointing in (False, True):
        mem = memory.estimate(spec, TrainSpec(seq_len=4096), Candidate("qlora", "ddp"), 2, 4,
                              on_gpu=True, gradient_checkpointing=checkpointing)
        assert mem.total == (mem.weights + mem.adapter + mem.gradients + mem.optimizer
                             + mem.activations + mem.logits + mem.overhead)
        assert mem.cuda_context <= mem.overhead


def test_checkpointing_sharding_and_offload_each_lower_the_peak():
    spec = models.resolve("llama-3.1-70b")
    train = TrainSpec(seq_len=4096)

    def peak(candidate, gc=True, world=8):
        return memory.estimate(spec, train, candidate, 1, world, on_gpu=True,
                               gradient_checkpointing=gc).total

    assert peak(Candidate("qlora", "fsdp"), gc=True) < peak(Candidate("qlora", "fsdp"), gc=False)
    assert peak(Candidate("qlora", "fsdp")) < peak(Candidate("qlora", "ddp"))
    assert peak(Candidate("qlora", "fsdp", offload=True)) < peak(Candidate("qlora", "fsdp"))
    assert peak(Candidate("qlora", "fsdp"), world=16) < peak(Candidate("qlora", "fsdp"), world=8)


def test_qlora_weights_are_about_a_quarter_of_bf16_for_the_decoder():
    spec = models.resolve("llama-3.1-70b")
    bf16 = memory.weights_bytes(spec, "lora", True, 1, False)
    nf4 = memory.weights_bytes(spec, "qlora", True, 1, False)
    # Decoder linears go from 16 to 4.127 bits; embeddings and lm_head stay 16-bit...
    assert 0.25 < nf4 / bf16 < 0.30
    # ...unless PEFT's k-bit preparation upcasts them to fp32: exactly their size more.
    upcast = memory.weights_bytes(spec, "qlora", True, 1, False, upcast_rest=True)
    rest = spec.parameters - spec.num_layers * sum(i * o for i, o in spec.linear_shapes().values())
    assert upcast - nf4 == pytest.approx(2 * rest, abs=8)


def test_every_reported_plan_fits_its_budget_or_says_so():
    for hw in ("1xRTX4090-24GB", "8xH100-80GB", "2x8xA100-80GB", "cpu"):
        for name in ("tiny", "llama-3.1-8b", "llama-3.1-70b", "qwen2.5-72b"):
            p = planner.plan(hardware.parse_spec(hw), models.resolve(name), TrainSpec())
            assert p.fits == (p.memory.total <= p.budget_bytes)
