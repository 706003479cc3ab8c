"""The memory model's loss term against a measurement: TRL's fused LM head on this CPU.

One fresh process per shape builds a one-layer Llama with a large vocabulary and a
narrow hidden size (so the loss phase dwarfs everything else), runs the forward and
backward the SFTTrainer runs (`fused_lm_head=True`), and reports how far its peak
resident memory rose above where it stood before the step. The GPU path (Triton
kernels) cannot be measured here; this pins the tile model and the CPU constant.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from ftlaunch.plan import memory
from ftlaunch.models import presets as models

_MEASURE = r"""
import sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

vocab, hidden, tokens = map(int, sys.argv[1:4])
config = AutoConfig.for_model(
    model_type="llama", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab, tie_word_embeddings=False)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
for param in model.parameters():
    param.requires_grad = False
model.model.layers[0].mlp.up_proj.weight.requires_grad = True  # a trained weight behind the head
add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
ids = torch.randint(0, vocab, (1, tokens))

def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

# Reset the peak (VmHWM) to the current RSS: what imports and model building reached
# before must not count (Linux >= 4.0, proc(5) clear_refs).
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_kib("VmRSS")
model(input_ids=ids, labels=ids, fused_lm_head=True, use_cache=False).loss.backward()
print((status_kib("VmHWM") - before) * 1024)
"""


@pytest.mark.parametrize("vocab, hidden, tokens", [
    (32768, 64, 1024),   # a tile of 1024 tokens x the whole vocabulary
    (65536, 64, 1024),   # twice the vocabulary: still one tile's width (32768)
    (16384, 128, 2048),  # a narrower vocabulary, more tokens
])
def test_fused_loss_peak_on_cpu_matches_the_model(vocab, hidden, tokens):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(vocab), str(hidden), str(tokens)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = int(proc.stdout.split()[-1])
    spec = dataclasses.replace(models.resolve("tiny"), vocab_size=vocab, hidden_size=hidden,
                               intermediate_size=2 * hidden, num_layers=1)
    predicted = memory.loss_bytes(spec, tokens, 1, False, memory.HF_TRL)
    print(f"vocab {vocab} hidden {hidden} tokens {tokens}: measured {measured / 2**20:.0f} MiB, "
          f"model {predicted / 2**20:.0f} MiB ({(measured - predicted) / predicted:+.1%})")
    assert abs(measured - predicted) / predicted <= 0.10, (measured, predicted)
