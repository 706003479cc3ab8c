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

from ftlaunch.plan import memory
from ftlaunch.models import presets as models
from ftlaunch.units import GIB
from ftlaunch.plan.planner import Candidate, TrainSpec

# torchtune's stack as its recipes configure it: bf16 LoRA weights, gradients and
# AdamW moments (2 + 2 + 4 bytes), an 8-chunk fp32 loss, compiled model.
TORCHTUNE = memory.Stack(adapter_bytes=2, optimizer_bytes=4, fused_lm_head=False,
                         loss_chunks=8, compiled=True)
# transformers' own loss: the whole logits tensor, upcast to fp32.
UNFUSED = memory.Stack(fused_lm_head=False)
TORCHTUNE_LORA = TrainSpec(seq_len=2048, lora_rank=8, lora_dropout=0.0,
                           lora_targets=("q_proj", "v_proj", "o_proj",
                                         "gate_proj", "up_proj", "down_proj"))


@pytest.mark.parametrize("method, published_gib", [("qlora", 7.4), ("lora", 16.2)])
def test_llama_8b_single_4090_matches_torchtune_within_15_percent(method, published_gib):
    spec = models.resolve("llama-3.1-8b")
    mem = memory.estimate(spec, TORCHTUNE_LORA, Candidate(method, "single"), micro_batch=2,
                          world=1, on_gpu=True, gradient_checkpointing=True, stack=TORCHTUNE)
    predicted = mem.allocated / GIB
    assert abs(predicted - published_gib) / published_gib <= 0.15, (predicted, mem)


@pytest.mark.parametrize("model, stack, recompute_dominates", [
    ("llama-3.1-8b", UNFUSED, False),         # the unchunked fp32 loss outweighs a layer
    ("llama-3.1-70b", TORCHTUNE, True),       # a wide layer outweighs an 8-chunk loss
    ("llama-3.1-8b", memory.HF_TRL, True),    # and a layer outweighs TRL's fused head
])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_peak_from_its_building_blocks(model, stack, recompute_dominates,
                                                  checkpointing):
    """Saved activations plus the loss/recompute phase, as memory.py's docstring builds it.

    Without checkpointing every layer's activations are saved and the loss phase comes on
    top. With it only each layer's input (hidden size, 16-bit, per token) is saved, and the
    backward's recompute of one layer and the loss phase are never alive together: the
    larger of the two counts.
    """
    spec = models.resolve(model)
    train, micro, elem = TrainSpec(seq_len=4096), 2, 2  # 16-bit activations on a GPU
    mem = memory.estimate(spec, train, Candidate("qlora", "ddp"), micro, 4, on_gpu=True,
                          gradient_checkpointing=checkpointing, stack=stack)
    one_layer = memory.layer_activation_bytes(spec, train, micro, elem, stack)
    loss_phase = memory.loss_bytes(spec, train.seq_len, micro, True, stack)
    assert (one_layer > loss_phase) is recompute_dominates
    if checkpointing:
        stored_inputs = spec.num_layers * train.seq_len * micro * spec.hidden_size * elem
        assert mem.activations + mem.logits == stored_inputs + max(one_layer, loss_phase)
    else:
        assert mem.activations + mem.logits == spec.num_layers * one_layer + loss_phase
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
    # Decoder linears go from 16 to 4.127 bits; embeddings and lm_head stay 16-bit.
    assert 0.25 < nf4 / bf16 < 0.30


def test_the_fused_head_holds_a_tile_not_the_logits():
    """TRL's fused LM head: the loss phase is one tile of the logits plus a few copies of
    the head's input, whatever the vocabulary; transformers' own loss holds all of them."""
    spec = models.resolve("llama-3.1-8b")  # vocabulary 128256
    fused = memory.loss_bytes(spec, 2048, 2, True, memory.HF_TRL)
    tile = memory.FUSED_TILE_TOKENS * memory.FUSED_TILE_VOCAB * 2
    head_input = 4096 * spec.hidden_size
    assert tile + 8 * head_input <= fused <= tile + 9 * head_input
    unfused = memory.loss_bytes(spec, 2048, 2, True, UNFUSED)
    assert unfused == 4096 * spec.vocab_size * (2 + 8)
    assert fused < unfused / 8


def test_label_smoothing_is_planned_with_the_whole_logits():
    """TRL computes the full logits for label smoothing (not its fused head): a recipe that
    asks for it is planned with them, through the real CLI."""
    import json
    import subprocess
    import sys

    def logits(*extra):
        out = subprocess.run(
            [sys.executable, "-m", "ftlaunch", "plan", "--model", "llama-3.1-8b", "--hardware",
             "1xH100-80GB", "--seq-len", "2048", "--global-batch-size", "2",
             "--no-gradient-checkpointing", "--json", *extra],
            capture_output=True, text=True, timeout=120, check=True)
        plan = json.loads(out.stdout)
        assert plan["per_device_batch_size"] == 2
        return plan["memory"]["logits"]

    smoothed = logits("--set", "label_smoothing_factor=0.1")
    assert smoothed == 4096 * 128256 * (2 + 8)
    assert logits() < smoothed / 8


def test_fused_tile_sizes_are_trls():
    from trl.kernels import chunked_logprob
    from trl.trainer import utils

    assert memory.FUSED_TILE_TOKENS == chunked_logprob.TOKEN_CHUNK_SIZE
    assert memory.FUSED_TILE_VOCAB == utils._CHUNKED_LOGPROB_CHUNK_SIZE



DPO_SPEC = TrainSpec(seq_len=1024, objective="dpo", reference_forward=True, lora_dropout=0.0)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_a_dpo_pair_counts_two_sequences_and_its_reference_pass(checkpointing):
    """A DPO micro-batch of 2 pairs holds what an SFT micro-batch of 4 sequences does.
    The reference forward (no gradients, after the policy's forward) fits inside the
    recompute / loss phase with checkpointing; without it, its layer working set comes
    on top of everything the policy saved, so the peak grows, and precomputed reference
    log-probs take that back."""
    from dataclasses import replace

    model = models.resolve("llama-8b")
    candidate = Candidate("lora", "single")

    def peak(spec, micro):
        return memory.estimate(model, spec, candidate, micro, 1, on_gpu=True,
                               gradient_checkpointing=checkpointing)

    sft = peak(TrainSpec(seq_len=1024, lora_dropout=0.0), 4)
    dpo = peak(DPO_SPEC, 2)
    precomputed = peak(replace(DPO_SPEC, reference_forward=False), 2)
    assert precomputed == sft
    if checkpointing:
        assert dpo == sft
    else:
        assert dpo.activations > sft.activations and dpo.total > sft.total
        one_layer = memory.layer_activation_bytes(model, DPO_SPEC, 4, 2, memory.HF_TRL)
        assert dpo.activations - sft.activations <= one_layer
