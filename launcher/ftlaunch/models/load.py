"""Loading a run's base model: one loader for the training worker and for export.

What is loaded is the run record's model (models.source.ModelSource, run.yaml's `model`
section). torch and transformers are imported inside the functions: the planner imports
ftlaunch.models.presets, and planning stays torch-free (nothing the planner imports may
import this module).
"""

from __future__ import annotations

from ftlaunch.errors import UserError
from ftlaunch.models.source import ModelSource


def precision_dtype(precision: str):
    """The torch dtype of a plan's precision: bf16, fp16, else fp32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def attention_implementation(dtype) -> str:
    """flash_attention_2 where it is installed and can run (Ampere or newer, 16-bit),
    else PyTorch's SDPA. Both honour the position_ids of packed sequences."""
    import importlib.util

    import torch

    if (importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
            and torch.cuda.get_device_capability()[0] >= 8
            and dtype in (torch.bfloat16, torch.float16)):
        return "flash_attention_2"
    return "sdpa"


def nf4_config(compute_dtype):
    """QLoRA's 4-bit quantisation of the base (NF4, double quantisation)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        # FSDP can only shard the packed 4-bit weights if they are stored in
        # the same dtype as everything else it flattens.
        bnb_4bit_quant_storage=compute_dtype,
    )


def load_base_model(model: ModelSource, dtype, *, quantize_4bit: bool = False,
                    seed: int | None = None, for_training: bool = False):
    """The base model the run record's `model` names, its weights in `dtype`.

    quantize_4bit: NF4-quantise the linear layers as QLoRA trains them (nf4_config, with
    `dtype` as the compute dtype). A --random-init base is never quantised (launch refuses
    --random-init with QLoRA).

    seed: the run's seed (RunRecord.seed: its recipe's training.seed). A
    --random-init base is rebuilt from model.config with random weights drawn after
    torch.manual_seed(seed): the same seed gives training, generation and merging the
    same weights. Only a --random-init model needs it.

    for_training: what the worker wants and export does not. The attention
    implementation is chosen (attention_implementation: flash_attention_2 or SDPA, both
    honouring packed sequences' position_ids; export leaves transformers' default), and
    the KV cache is turned off.

    A checkpoint that cannot be loaded (OSError: a missing folder, no access) is a
    UserError."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": dtype}
    if for_training:
        kwargs["attn_implementation"] = attention_implementation(dtype)
    if model.random_init:
        from ftlaunch.models.builtin import build_random_model

        if seed is None:
            raise ValueError("A --random-init base is rebuilt from the run's seed: pass "
                             "seed= (the recipe's training.seed).")
        # The config's model_type is transformers' own (AutoConfig.for_model): its code is
        # used, never remote code, so trust_remote_code is not passed.
        result = build_random_model(model.config, seed, **kwargs)
    else:
        kwargs["trust_remote_code"] = model.trust_remote_code
        if quantize_4bit:
            kwargs["quantization_config"] = nf4_config(dtype)
        try:
            result = AutoModelForCausalLM.from_pretrained(model.load_from, **kwargs)
        except OSError as exc:
            what = "model" if for_training else "the run's base model"
            raise UserError(f"Cannot load {what} {model.load_from}: {exc}") from None
    if for_training:
        result.config.use_cache = False  # the KV cache is useless in training and costs memory
    # QLoRA without PEFT's prepare_model_for_kbit_training: it upcasts every 16-bit
    # parameter left after quantisation to fp32, which doubles the embeddings and lm_head
    # (+2 GiB for Llama 3 8B) and, through the fp32 norm weights, turns the residual stream
    # and the MLP outputs fp32 under autocast (twice the activation memory). The frozen
    # base stays in the compute dtype, as torchtune and Unsloth keep it; RMSNorm still
    # computes its variance in fp32. PEFT freezes the base, and non-reentrant gradient
    # checkpointing (the Trainer's) needs no input gradients.
    return result
