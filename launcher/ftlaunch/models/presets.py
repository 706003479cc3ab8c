"""Model facts: presets from recipes/models.yaml, or a local config.json, and exact sizes.

Sizes come from arithmetic over the config (no torch, so planning stays fast);
tests cross-check the arithmetic against meta-device instantiation and the
published totals.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from ftlaunch.errors import UserError
from ftlaunch.resources import recipes_dir

# Architectures whose linear layers and norms the arithmetic below knows exactly.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma2", "phi3")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # what the user typed, resolved to a preset name where there is one
    source: str  # what is loaded: hub id, local path, or builtin:NAME
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    context_length: int | None = None  # max_position_embeddings: the longest sequence it was built for

    @property
    def is_builtin(self) -> bool:
        return self.source.startswith("builtin:")

    @property
    def parameters(self) -> int:
        return parameter_count(self)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every linear layer in one decoder layer."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        if self.model_type == "phi3":
            return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h),
                    "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def lora_target_shapes(self, targets: tuple[str, ...] | str) -> list[tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer that LoRA
        targets: all of them for "all-linear", else the named ones this architecture has."""
        shapes = self.linear_shapes()
        if targets == "all-linear":
            return list(shapes.values())
        return [shapes[t] for t in targets if t in shapes]

    def embedding_parameters(self) -> int:
        """Input embedding plus an untied lm_head: the weights QLoRA keeps in 16 bits."""
        embed = self.vocab_size * self.hidden_size
        return embed if self.tie_word_embeddings else 2 * embed


def parameter_count(spec: ModelSpec) -> int:
    """Exact total, tied embeddings counted once, biases and norms included."""
    h = spec.hidden_size
    linear = sum(i * o for i, o in spec.linear_shapes().values())
    bias = 0
    if spec.model_type == "qwen2":  # q, k and v projections carry a bias; o does not
        bias = spec.num_heads * spec.head_dim + 2 * spec.num_kv_heads * spec.head_dim
    norms_per_layer = 4 if spec.model_type == "gemma2" else 2
    per_layer = linear + bias + norms_per_layer * h
    return spec.embedding_parameters() + spec.num_layers * per_layer + h  # + final norm


def lora_parameter_count(spec: ModelSpec, rank: int, targets: tuple[str, ...] | str) -> int:
    """LoRA adds A (r x in) and B (out x r) to each targeted linear layer."""
    return spec.num_layers * sum(rank * (i + o) for i, o in spec.lora_target_shapes(targets))


@lru_cache(maxsize=1)
def load_presets() -> dict[str, dict]:
    with open(recipes_dir() / "models.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def preset_names() -> list[str]:
    return list(load_presets())


def resolve(name: str) -> ModelSpec:
    """A preset name or alias, a hub id of a preset, a local folder, or a cached hub id."""
    presets = load_presets()
    for key, entry in presets.items():
        if name == key or name in entry.get("aliases", ()) or name == entry["id"]:
            return from_config(key, entry["id"], entry["config"])
    path = Path(name).expanduser()
    if path.exists():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise UserError(f"--model {name}: the folder has no config.json, so it is not a "
                            "Hugging Face model folder.")
        return from_config(name, str(path.resolve()), _read_json(config_file))
    cached = cached_hub_config(name)
    if cached is not None:
        return from_config(name, name, _read_json(cached))
    known = ", ".join(preset_names())
    close = close_presets(name)
    guess = (f"Did you mean {close[0]}" + (f" (or {', '.join(close[1:])})" if close[1:] else "")
             + "? ") if close else ""
    raise UserError(
        f"--model {name!r} is not a preset, a local model folder, or a hub model whose "
        f"config.json is in the local Hugging Face cache. {guess}Presets: {known}. "
        "`ftlaunch recipes` lists them with their hub ids."
    )


def close_presets(name: str) -> list[str]:
    """Preset names whose name, alias or hub id is close to `name` (a typo), best first."""
    import difflib

    spellings: dict[str, str] = {}
    for key, entry in load_presets().items():
        for spelling in (key, *entry.get("aliases", ()), entry["id"]):
            spellings.setdefault(spelling.lower(), key)
    matches = difflib.get_close_matches(name.lower(), list(spellings), n=6, cutoff=0.75)
    return list(dict.fromkeys(spellings[m] for m in matches))[:3]


def from_config(name: str, source: str, config: dict) -> ModelSpec:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"--model {name}: model_type {model_type!r} is not one ftlaunch can size yet "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})."
        )
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return ModelSpec(
            name=name,
            source=source,
            model_type=model_type,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            context_length=int(config["max_position_embeddings"])
            if config.get("max_position_embeddings") else None,
        )
    except KeyError as missing:
        raise UserError(f"--model {name}: its config.json lacks {missing}.") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"Cannot read {path}: {exc}") from None


def cached_hub_config(repo_id: str) -> Path | None:
    if repo_id.count("/") != 1:
        return None
    hub = Path(os.environ.get("HF_HUB_CACHE") or
               Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    snapshots = hub / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    configs = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    return configs[-1] if configs else None
