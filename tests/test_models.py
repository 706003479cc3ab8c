"""Model facts: presets, aliases, local folders, and exact sizes cross-checked with torch/peft."""

import json
import warnings

import pytest

from ftlaunch.models import presets as models
from ftlaunch.errors import UserError

PRESETS = models.load_presets()


def _meta_model(config: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))


def _real_model(config: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))


def _lora_trainable(model, **lora_kwargs) -> int:
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_presets_are_not_empty():
    assert {"tiny", "llama-3.1-8b", "llama-3.1-70b"} <= set(PRESETS)
    assert models.preset_names() == list(PRESETS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameters_match_published_and_meta_instantiation(name):
    entry = PRESETS[name]
    spec = models.resolve(name)
    assert spec.name == name
    assert spec.source == entry["id"]
    assert spec.parameters == entry["parameters"]
    model = _meta_model(entry["config"])
    counted = sum(p.numel() for p in model.parameters())
    assert spec.parameters == counted


@pytest.mark.parametrize("alias, preset", [
    ("llama-8b", "llama-3.1-8b"),
    ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b"),
    ("llama-70b", "llama-3.1-70b"),
    ("smollm2", "smollm2-135m"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-0.5b"),
])
def test_aliases_and_hub_ids_resolve_to_the_preset(alias, preset):
    spec = models.resolve(alias)
    assert spec.name == preset
    assert spec.source == PRESETS[preset]["id"]
    assert spec.parameters == PRESETS[preset]["parameters"]


def test_every_alias_resolves_to_its_preset():
    for name, entry in PRESETS.items():
        for alias in entry.get("aliases") or []:
            assert models.resolve(alias).name == name, alias


def test_lora_count_llama_8b_matches_peft_on_meta():
    spec = models.resolve("llama-3.1-8b")
    expected = _lora_trainable(_meta_model(PRESETS["llama-3.1-8b"]["config"]),
                               r=16, target_modules="all-linear")
    assert models.lora_parameter_count(spec, 16, "all-linear") == expected
    assert expected == 41_943_040  # the widely quoted figure for Llama-3.1-8B, r=16, all-linear


@pytest.mark.parametrize("name", ["tiny", "qwen2.5-0.5b", "mistral-7b", "gemma-2-9b",
                                  "phi-3-mini"])
def test_lora_all_linear_matches_peft_per_architecture(name):
    spec = models.resolve(name)
    expected = _lora_trainable(_meta_model(PRESETS[name]["config"]), r=8,
                               target_modules="all-linear")
    assert models.lora_parameter_count(spec, 8, "all-linear") == expected


@pytest.mark.parametrize("name, targets", [
    ("tiny", ("q_proj", "v_proj")),
    ("qwen2.5-0.5b", ("q_proj", "k_proj", "v_proj", "o_proj")),
    ("gemma-2-9b", ("gate_proj", "down_proj")),
    ("phi-3-mini", ("qkv_proj", "gate_up_proj")),
])
def test_lora_named_targets_match_peft(name, targets):
    spec = models.resolve(name)
    expected = _lora_trainable(_meta_model(PRESETS[name]["config"]), r=4,
                               target_modules=list(targets))
    assert expected > 0
    assert models.lora_parameter_count(spec, 4, targets) == expected


def _reduced(config: dict) -> dict:
    """The preset's architecture, shrunk so that a real (not meta) model is tiny."""
    heads = 4
    kv = heads if config.get("num_key_value_heads") == config["num_attention_heads"] else 2
    return {**config, "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": heads, "num_key_value_heads": kv,
            "head_dim": 16, "max_position_embeddings": 256,
            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen2.5-7b", "gemma-2-9b", "phi-3-mini",
                                  "mistral-7b"])
def test_from_config_on_reduced_real_model(name):
    config = _reduced(PRESETS[name]["config"])
    spec = models.from_config(f"reduced-{name}", "local", config)
    model = _real_model(config)
    assert spec.parameters == sum(p.numel() for p in model.parameters())
    assert models.lora_parameter_count(spec, 16, "all-linear") == _lora_trainable(
        model, r=16, target_modules="all-linear")


def test_local_folder_with_config_json_resolves(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(PRESETS["tiny"]["config"]), encoding="utf-8")
    spec = models.resolve(str(folder))
    assert spec.source == str(folder.resolve())
    assert spec.parameters == PRESETS["tiny"]["parameters"]
    assert spec.is_builtin is False


_TINY_WITHOUT_HIDDEN = {k: v for k, v in PRESETS["tiny"]["config"].items() if k != "hidden_size"}


@pytest.mark.parametrize("files, named", [
    ({"weights.bin": b"\0"}, "config.json"),  # no config.json at all
    ({"config.json": json.dumps({"model_type": "gpt2"}).encode()}, "gpt2"),  # cannot size it
    ({"config.json": json.dumps(_TINY_WITHOUT_HIDDEN).encode()}, "hidden_size"),  # incomplete
])
def test_local_folder_that_cannot_be_sized_is_a_user_error(tmp_path, files, named):
    folder = tmp_path / "model"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    with pytest.raises(UserError) as info:
        models.resolve(str(folder))
    assert named in str(info.value)


@pytest.mark.parametrize("name", ["nosuchmodel", "nosuchorg/nosuchmodel"])
def test_unknown_name_is_a_user_error(name, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(UserError) as info:
        models.resolve(name)
    assert name in str(info.value)
    assert "tiny" in str(info.value)  # lists the presets


def test_hub_id_with_cached_config_resolves(monkeypatch, tmp_path):
    hub = tmp_path / "hub"
    snapshot = hub / "models--someorg--small-llama" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(PRESETS["tiny"]["config"]), encoding="utf-8")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    spec = models.resolve("someorg/small-llama")
    assert spec.source == "someorg/small-llama"
    assert spec.parameters == PRESETS["tiny"]["parameters"]
