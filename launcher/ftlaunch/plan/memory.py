"""Per-device peak memory of one training step, term by term (bytes). Pure, no torch.

Each term names where its formula comes from. The model is explicit rather
than fitted, so a wrong term shows up in a back-test (tests/test_memory.py)
instead of hiding inside a fudge factor.

The peak is not the sum of everything a step ever allocates: with gradient
checkpointing the LM head / loss phase (end of forward, start of backward) and
the recompute of one decoder layer (inside backward) are never alive together.
So the peak is

    persistent (weights, adapter, its gradients, optimizer state, CUDA context)
  + saved activations (every layer's input with checkpointing, all of every
    layer's activations without)
  + the larger of: one layer's recomputed activations, the loss phase
    (the loss phase alone when nothing is recomputed: it comes on top).

The terms are reported so that they add up to that peak: `logits` is what the
loss phase adds beyond the recompute phase.

DPO (spec.sequences_per_example: 2): each example is a chosen and a rejected sequence
in the same batch, so every activation and loss term counts twice the rows. Its
reference forward pass (spec.reference_forward) runs after the policy's forward, under
no_grad, while the policy's saved activations wait for backward: it saves nothing, and
its transient is one layer's working set, then the LM head's tiles. With gradient
checkpointing that fits inside the recompute / loss phase already counted; without it,
what one layer's working set exceeds the loss phase's tiles is added to `activations`.
Precomputed reference log-probs remove the pass (and the term).

KTO (one sequence per example) makes three forward passes under no_grad: the policy
on the KL completions before its own forward (nothing saved is alive yet, so its peak
is below the step's), then the reference on the completions and on the KL completions,
after it: the same transient as DPO's reference pass, counted the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ftlaunch.models.presets import ModelSpec, lora_parameter_count
from ftlaunch.units import MIB

if TYPE_CHECKING:
    from ftlaunch.plan.planner import Candidate, TrainSpec

# NF4 with double quantisation (Dettmers et al. 2023, QLoRA, section 3): 4 bits per
# weight, an 8-bit absmax per 64-weight block, one fp32 constant per 256 blocks:
# 4 + 8/64 + 32/(64*256) = 4.127 bits.
NF4_BYTES_PER_PARAM = (4 + 8 / 64 + 32 / (64 * 256)) / 8

# The CUDA context with torch's kernels loaded (lazy module loading, CUDA 12):
# ~0.5 GiB on Ampere/Hopper as nvidia-smi shows for an idle `torch.zeros(1).cuda()`.
# It is not part of torch.cuda.max_memory_allocated(), but it is on the card.
CUDA_CONTEXT_BYTES = 512 * MIB
# ZeRO-3's stage3_max_live_parameters and stage3_max_reuse_distance (DeepSpeed's defaults
# and transformers' "auto", written by render.py): a gathered parameter is kept, not
# released, while it will be used again within this many parameters, so up to this many
# stay gathered between a layer's forward and its backward.
ZERO3_LIVE_PARAMETERS = 1_000_000_000
# NCCL communicators and their buffers once there is a peer (NCCL_BUFFSIZE 4 MiB per
# channel and peer, a few channels, plus the cuBLAS/NCCL workspaces): ~0.5 GiB.
NCCL_BYTES = 512 * MIB


# TRL's fused LM head (SFTTrainer since TRL 1.x; trl/kernels/chunked_logprob.py): the
# LM head and the log-softmax run in tiles of this many tokens x vocabulary entries, so
# the (tokens x vocab) logits never exist. tests/test_memory.py checks TRL's constants.
FUSED_TILE_TOKENS = 4096
FUSED_TILE_VOCAB = 32768
# Tile-sized buffers alive at the loss phase's peak. GPU: TRL's Triton kernels fold each
# tile in place into per-token statistics, one buffer (from the kernel's code; no GPU
# measurement yet). CPU: the torch fallback keeps fp32 temporaries of the tile (z,
# exp(z), masks, products): 8.3 tiles measured here over tiles of 128-512 MiB
# (tests/test_memory_cpu.py measures it against this model).
FUSED_TILES_GPU = 1.0
FUSED_TILES_CPU = 8.3


@dataclass(frozen=True)
class Stack:
    """What the training code does that changes memory. The default is ftlaunch's
    own stack: transformers + PEFT + TRL, eager mode."""

    # PEFT autocasts LoRA weights to fp32 (autocast_adapter_dtype=True), so they,
    # their gradients and each of AdamW's two moments take 4 bytes.
    adapter_bytes: int = 4
    optimizer_bytes: int = 8
    # TRL's fused LM head (above). Without it: transformers' ForCausalLMLoss upcasts
    # the whole logits tensor to fp32 and cross-entropy keeps an fp32 log-softmax for
    # backward, 4 + 4 bytes per logit on top of the 16-bit logits the LM head returns;
    # a chunked loss (torchtune's CEWithChunkedOutputLoss) keeps 1/chunks of the fp32 part.
    fused_lm_head: bool = True
    loss_fp32_bytes_per_logit: int = 8
    loss_chunks: int = 1
    # torch.compile fuses RMSNorm and act(gate) * up, so they save fewer tensors.
    compiled: bool = False


HF_TRL = Stack()


@dataclass(frozen=True)
class Breakdown:
    weights: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int
    cuda_context: int = 0  # part of overhead; on the card but not in torch's allocator

    @property
    def total(self) -> int:
        return (self.weights + self.adapter + self.gradients + self.optimizer
                + self.activations + self.logits + self.overhead)

    @property
    def allocated(self) -> int:
        """What torch.cuda.max_memory_allocated() would report: the total less the context."""
        return self.total - self.cuda_context


def estimate(model: ModelSpec, spec: TrainSpec, candidate: Candidate, micro_batch: int,
             world: int, on_gpu: bool, gradient_checkpointing: bool,
             stack: Stack = HF_TRL) -> Breakdown:
    sharded = candidate.engine in ("fsdp", "deepspeed")
    shards = world if sharded else 1
    elem = 2 if on_gpu else 4  # 16-bit activations on GPU, fp32 on CPU
    if spec.full_logits:
        stack = replace(stack, fused_lm_head=False)
    trainable = lora_parameter_count(model, spec.lora_rank, spec.lora_targets)
    # DDP keeps a second copy of the gradients in its all-reduce buckets
    # (gradient_as_bucket_view is off in the Trainer).
    grad_copies = 2 if candidate.engine == "ddp" else 1
    offloaded = candidate.offload  # FSDP offload_params / ZeRO-3 offload: states live on the CPU

    rows = micro_batch * spec.sequences_per_example  # sequences in one forward pass
    one_layer = layer_activation_bytes(model, spec, rows, elem, stack)
    loss_phase = loss_bytes(model, spec.seq_len, rows, on_gpu, stack)
    if gradient_checkpointing:
        # Each layer's input is kept; one layer at a time is recomputed in backward.
        checkpoints = model.num_layers * spec.seq_len * rows * model.hidden_size * elem
        activations = checkpoints + one_layer
        logits = max(0, loss_phase - one_layer)
    else:
        activations = model.num_layers * one_layer
        logits = loss_phase
        if spec.reference_forward:
            # The reference's layer working set on top of everything the policy saved;
            # of the loss phase only the head's saved input is alive then, not its tiles.
            activations += max(0, one_layer - (loss_phase - _head_saved(model, spec.seq_len,
                                                                        rows, elem, stack)))

    context = CUDA_CONTEXT_BYTES if on_gpu else 0
    overhead = context + (NCCL_BYTES if on_gpu and world > 1 else 0)
    if candidate.method == "qlora":
        # bitsandbytes dequantises one weight matrix at a time to the compute dtype.
        overhead += 2 * max(i * o for i, o in model.linear_shapes().values())
    if not on_gpu:
        overhead += 512 * MIB  # the worker process itself: Python, torch, transformers

    adapter_states = 0 if offloaded else trainable
    # DPO from a starting adapter: its frozen copy (the reference) sits beside it.
    copies = 2 if spec.reference_adapter else 1
    return Breakdown(
        weights=weights_bytes(model, candidate.method, on_gpu, shards, offloaded,
                              zero3=candidate.engine == "deepspeed" and candidate.zero_stage == 3),
        adapter=copies * stack.adapter_bytes * adapter_states // shards,
        gradients=grad_copies * stack.adapter_bytes * adapter_states // shards,
        optimizer=stack.optimizer_bytes * adapter_states // shards,
        activations=activations,
        logits=logits,
        overhead=overhead,
        cuda_context=context,
    )


def weights_bytes(model: ModelSpec, method: str, on_gpu: bool, shards: int, offload: bool,
                  zero3: bool = False) -> int:
    """Base weights resident on one device.

    LoRA: 2 bytes per parameter (bf16/fp16); fp32 on CPU. QLoRA: the decoder's
    linear layers in NF4; embeddings, lm_head and norms stay in the compute dtype
    (bitsandbytes replaces nn.Linear only, transformers skips lm_head, and ftlaunch
    does not upcast them: see models.load).
    Sharded engines hold 1/world of it plus the two layers being all-gathered
    (current and prefetched: FSDP's forward/backward prefetch, ZeRO-3's prefetch
    bucket), plus the embeddings and lm_head whole: FSDP's root unit, which holds
    them, is not resharded between forward and backward, and ZeRO-3 gathers lm_head
    for the loss, the peak (measured on 2 CPU ranks, docs/BENCHMARKS.md: for a model
    with a large vocabulary they are a good part of the base). ZeRO-3 keeps more than
    two layers gathered: what it will use again within ZERO3_LIVE_PARAMETERS parameters
    stays (a model smaller than that stays whole between forward and backward). With
    CPU offload only those two layers and the embeddings are there.
    """
    dense = 2 if on_gpu else 4
    total = model.parameters
    linear = model.num_layers * sum(i * o for i, o in model.linear_shapes().values())
    per_linear = NF4_BYTES_PER_PARAM if method == "qlora" else dense
    resident = linear * per_linear + (total - linear) * dense
    gathered = 2 * (linear / model.num_layers) * per_linear
    if zero3 and not offload:
        gathered = max(gathered, min(linear, ZERO3_LIVE_PARAMETERS) * per_linear)
    if offload:
        return int(gathered + model.embedding_parameters() * dense)
    if shards > 1:
        embeddings = model.embedding_parameters() * dense
        return int(resident / shards + gathered + embeddings * (1 - 1 / shards))
    return int(resident)


def layer_activation_bytes(model: ModelSpec, spec: TrainSpec, micro_batch: int, elem: int,
                           stack: Stack) -> int:
    """Bytes one decoder layer saves for backward at this micro-batch.

    Per token, following Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", section 4.1), adapted to
    GQA + SwiGLU + RMSNorm with SDPA/flash attention (no s^2 score matrix):
      attention: normed input H, q, k, v, attention output   -> H + 2q + 2kv
      MLP: normed input H, gate, up, act(gate), gate * up      -> H + 4I (compiled: H + 3I)
      two RMSNorms: fp32 input (2 units) + normed bf16 output   -> 6H (compiled: 2H)
      LoRA dropout keeps a masked copy of each target's input  -> 5H + q + I (all-linear)
    """
    h, i = model.hidden_size, model.intermediate_size
    q = model.num_heads * model.head_dim
    kv = model.num_kv_heads * model.head_dim
    per_token = (h + 2 * q + 2 * kv)
    per_token += (h + 3 * i) if stack.compiled else (h + 4 * i)
    per_token += 2 * h if stack.compiled else 6 * h
    if spec.lora_dropout > 0:
        per_token += _dropout_copies(model, spec.lora_targets)
    return spec.seq_len * micro_batch * per_token * elem


def _dropout_copies(model: ModelSpec, targets) -> int:
    """Elements per token that LoRA dropout copies: the input width of each target."""
    return sum(i for i, _ in model.lora_target_shapes(targets))


def _head_saved(model: ModelSpec, seq_len: int, rows: int, elem: int, stack: Stack) -> int:
    """Of loss_bytes, what the LM head keeps for backward once its forward is done."""
    if not stack.fused_lm_head:
        return seq_len * rows * model.vocab_size * elem  # the 16-bit logits
    return seq_len * rows * (model.hidden_size * elem + 64)


def loss_bytes(model: ModelSpec, seq_len: int, micro_batch: int, on_gpu: bool,
               stack: Stack) -> int:
    """What the LM head and the loss hold at their peak (activations in the compute
    dtype: 16-bit on a GPU, fp32 on a CPU)."""
    elem = 2 if on_gpu else 4
    tokens = seq_len * micro_batch
    if stack.fused_lm_head:
        tile = min(tokens, FUSED_TILE_TOKENS) * min(model.vocab_size, FUSED_TILE_VOCAB) * elem
        tiles = FUSED_TILES_GPU if on_gpu else FUSED_TILES_CPU
        # The head's input (a copy, saved for backward), its fp32 gradient accumulator and
        # that gradient cast back; the per-token statistics are a few floats per token.
        hidden = tokens * model.hidden_size * (elem + 4 + elem)
        return int(tiles * tile) + hidden + tokens * 64
    logits = tokens * model.vocab_size
    return logits * elem + logits * stack.loss_fp32_bytes_per_logit // stack.loss_chunks
