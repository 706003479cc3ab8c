"""`ftlaunch merge` and `ftlaunch generate` on the session's tiny run (conftest.tiny_run, trained
on CPU through the real CLI), merged in a copy of its run directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import run_ftlaunch

PROMPTS = ("What is 7 + 5?", "Say hello.")


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory) -> Path:
    """A copy of the session's tiny run: merging writes RUN_DIR/merged, and the shared run
    directory must stay as training left it."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(tiny_run[1], run_dir)
    return run_dir


@pytest.fixture(scope="module")
def merged(run_dir):
    proc = run_ftlaunch("merge", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, run_dir / "merged"


def _probe(tokenizer):
    """Independent of ftlaunch's own probe: two chat prompts with the generation prompt."""
    return [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                    tokenize=False, add_generation_prompt=True),
                      return_tensors="pt", add_special_tokens=False) for p in PROMPTS]


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_merge_says_where_and_how_close_it_checked(merged, run_dir):
    proc, out = merged
    assert f"Merged model: {out}" in proc.stdout
    assert "max |logit difference|" in proc.stdout and "tolerance" in proc.stdout
    info = json.loads((out / "ftlaunch-merge.json").read_text())
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    # The check means something: the adapter moves the logits far more than the merge error.
    assert info["adapter_effect"] > 100 * info["tolerance"]
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".merged")]


def test_merged_folder_is_a_plain_model_with_the_adapted_logits(merged, run_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = merged
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not [name for name in plain.state_dict() if "lora_" in name]
    assert not (out / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(str(out))

    record = yaml.safe_load((run_dir / "run.yaml").read_text())
    base = AutoModelForCausalLM.from_pretrained(record["model"]["load_from"])
    adapted = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    with torch.no_grad():
        for inputs in _probe(tokenizer):
            want = adapted(**inputs).logits
            got = plain(**inputs).logits
            with adapted.disable_adapter():
                before = adapted(**inputs).logits
            scale = want.abs().max().item()
            assert torch.allclose(got, want, rtol=0, atol=1e-4 * scale), \
                (got - want).abs().max().item()
            assert (want - before).abs().max().item() > 1e-2 * scale  # the adapter did something


def test_merging_again_replaces_only_an_earlier_merge(merged, run_dir, tmp_path):
    _, out = merged
    before = (out / "ftlaunch-merge.json").stat().st_mtime_ns
    proc = run_ftlaunch("merge", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert (out / "ftlaunch-merge.json").stat().st_mtime_ns > before  # written anew
    assert (out / "model.safetensors").is_file()
    assert not list(out.parent.glob(".merged.*"))  # no staging or moved-aside copy left

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    proc = run_ftlaunch("merge", str(run_dir), "--out", str(foreign))
    assert proc.returncode == 2
    assert "will not overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert _tree(foreign) == {"notes.txt": b"keep me"}


def test_merge_of_an_unfinished_or_missing_run_exits_2(run_dir, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished, ignore=shutil.ignore_patterns("adapter", "merged"))
    proc = run_ftlaunch("merge", str(unfinished))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no finished adapter" in proc.stderr and "Traceback" not in proc.stderr
    assert not (unfinished / "merged").exists()

    proc = run_ftlaunch("merge", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "nowhere").exists()


def test_a_failed_check_saves_nothing(run_dir, tmp_path, monkeypatch):
    from ftlaunch.export import merge
    from ftlaunch.errors import UserError

    monkeypatch.setitem(merge.MERGE_RTOL, "float32", -1.0)  # no difference can pass
    with pytest.raises(UserError, match="largest logit difference on the probe is"):
        merge.merge(run_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bf16_merge_uses_the_looser_tolerance(run_dir, tmp_path, monkeypatch):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftlaunch.export import adapted
    from ftlaunch.export import merge

    # What a GPU does (bf16), exercised on CPU.
    monkeypatch.setattr(adapted, "device_and_dtype", lambda: ("cpu", torch.bfloat16))
    out = merge.merge(run_dir, tmp_path / "bf16")
    assert merge.read_merge_record(out)["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    # Independently: the saved folder against base + adapter, both run in bf16, on the
    # test's own prompts, within the bf16 tolerance merge() documents (MERGE_RTOL).
    plain = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto").eval()
    assert plain.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    record = yaml.safe_load((run_dir / "run.yaml").read_text())
    base = AutoModelForCausalLM.from_pretrained(record["model"]["load_from"],
                                                dtype=torch.bfloat16)
    adapted = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    with torch.no_grad():
        for inputs in _probe(tokenizer):
            want = adapted(**inputs).logits.float()
            got = plain(**inputs).logits.float()
            with adapted.disable_adapter():
                before = adapted(**inputs).logits.float()
            tolerance = merge.MERGE_RTOL["bfloat16"] * max(1.0, want.abs().max().item())
            assert (got - want).abs().max().item() <= tolerance
            # A merge that lost the adapter would fail: it moves the logits past the tolerance.
            assert (want - before).abs().max().item() > 5 * tolerance


def test_generate_prints_the_greedy_reply_the_merged_model_gives(merged, run_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc = run_ftlaunch("generate", str(run_dir), "--prompt", PROMPTS[0], "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Independently: greedy decoding with the merged folder and plain transformers. (A tiny
    # model trained for 12 steps may well answer <|end|> at once, i.e. the empty string.)
    _, out = merged
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    inputs = _probe(tokenizer)[0]
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    reply = tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert proc.stdout == reply + "\n"
