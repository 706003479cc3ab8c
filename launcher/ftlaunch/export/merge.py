"""`ftlaunch merge`: a finished run's adapter merged into its base model, checked against
base + adapter on probe logits, and saved as a standalone model folder (atomically)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

from ftlaunch import filemodes
from ftlaunch.errors import UserError
from ftlaunch.export import adapted
from ftlaunch.hashing import update_with_file

MERGE_RECORD = "ftlaunch-merge.json"

# Largest |merged - (base + adapter)| logit difference accepted, relative to the logit
# scale (max |logit| on the probe, at least 1). fp32 differs only by summation order;
# bf16 rounds W + scale * B @ A to 8 significant bits once per layer, where the unmerged
# model rounds each path separately: on random-init Llamas merged in bf16 (CPU) the largest
# difference was 1.7% of the logit scale at 8 layers and 2.4% at 24, so bf16 gets 5%.
# (fp32 measured ~1.4e-6 relative at 24 layers.)
MERGE_RTOL = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 2e-2}

# Short chat exchanges the merge check runs through both models.
PROBE_CONVERSATIONS = (
    [{"role": "user", "content": "What is 12 + 30?"},
     {"role": "assistant", "content": "12 + 30 = 42."}],
    [{"role": "user", "content": "Name a colour of the sky."},
     {"role": "assistant", "content": "Blue, on a clear day."}],
)
PROBE_MAX_TOKENS = 64


def merge(run_dir: Path, out: Path | None = None) -> Path:
    """Merge a finished run's adapter into its base model and save a standalone model.

    The base is reloaded unquantised (bf16 on a GPU, fp32 on CPU; never the 4-bit
    weights of a QLoRA run), the adapter applied with PEFT and folded in with
    merge_and_unload. Before anything is written, the merged model's logits on a probe
    batch must match base + adapter within MERGE_RTOL x the logit scale; otherwise a
    UserError names the difference and nothing is saved.

    The result goes to `out` (default RUN_DIR/merged): written to a hidden sibling and
    renamed, so a folder under that name is always complete. An existing non-empty
    `out` is replaced only when it is an earlier merge of this same run (its
    ftlaunch-merge.json names this run directory or this exact adapter); anything else
    is refused. The returned folder holds the model, the tokenizer and
    ftlaunch-merge.json (the check's numbers; see read_merge_record)."""
    run_dir = Path(run_dir)
    record = adapted.finished_record(run_dir)
    out = Path(out) if out is not None else run_dir / "merged"
    adapter_digest = _adapter_digest(run_dir)
    _recover_interrupted(out)
    _check_merge_target(out, run_dir, adapter_digest)  # refusals come before the slow imports

    import torch

    device, dtype = adapted.device_and_dtype()
    tokenizer = adapted.load_tokenizer(run_dir, record)
    base = adapted.load_base(record, dtype)
    if getattr(base.config, "quantization_config", None):
        raise UserError(f"The base checkpoint {record.model.load_from} is itself "
                        "quantised; merging into quantised weights would round the adapter away. "
                        "Merge into an unquantised copy of the base instead. Nothing was saved.")
    model = adapted.apply_adapter(base, run_dir).to(device).eval()
    probes = [p.to(device) for p in probe_inputs(tokenizer)]
    with torch.no_grad():
        expected = [model(**p).logits.float() for p in probes]
        with model.disable_adapter():
            base_only = [model(**p).logits.float() for p in probes]
        try:
            merged = model.merge_and_unload(safe_merge=True)
        except ValueError as exc:  # safe_merge found NaNs in the merged weights
            raise UserError(f"Merging the adapter of {run_dir} failed: {exc}. Nothing was "
                            "saved.") from None
        merged.eval()
        got = [merged(**p).logits.float() for p in probes]
    dtype_name = str(dtype).removeprefix("torch.")
    scale = max(1.0, max(e.abs().max().item() for e in expected))
    tolerance = MERGE_RTOL[dtype_name] * scale
    max_diff = max((g - e).abs().max().item() for g, e in zip(got, expected))
    # How much the adapter moves the logits: the yardstick for the merge error above.
    effect = max((e - b).abs().max().item() for e, b in zip(expected, base_only))
    if not max_diff <= tolerance:  # NaN fails too
        raise UserError(
            f"The merged model does not reproduce {run_dir}'s base + adapter: the largest logit "
            f"difference on the probe is {max_diff:.3g}, over the tolerance {tolerance:.3g} "
            f"({MERGE_RTOL[dtype_name]:g} x logit scale {scale:.3g}, {dtype_name}). Nothing was "
            "saved; the adapter in the run directory can still be used with `ftlaunch generate`.")
    leftover = [name for name, _ in merged.named_parameters() if "lora_" in name]
    if leftover:
        raise UserError(f"The merged model still has LoRA weights ({leftover[0]}, ...); nothing "
                        "was saved.")

    merge_record = {
        "run_dir": str(run_dir.resolve()),
        "adapter_sha256": adapter_digest,
        "base": ("random-init:" + record.model.name if record.model.random_init
                 else record.model.load_from),
        "trained_method": record.strategy.method,
        "dtype": dtype_name,
        "device": device,
        "probe_tokens": sum(int(p["input_ids"].numel()) for p in probes),
        "max_abs_logit_diff": max_diff,
        "adapter_effect": effect,
        "logit_scale": scale,
        "tolerance": tolerance,
    }
    _save_atomically(out, merged, tokenizer, merge_record)
    return out


def read_merge_record(merged_dir: Path) -> dict:
    """What merge() measured and wrote beside the model (ftlaunch-merge.json)."""
    return json.loads((Path(merged_dir) / MERGE_RECORD).read_text(encoding="utf-8"))


def probe_inputs(tokenizer) -> list:
    """One tokenized batch (1 x tokens) per probe conversation: the chat template when the
    tokenizer has one, else plain "user: ... assistant: ..." text. One sequence per batch, so
    no padding is needed (some tokenizers have no pad token)."""
    batches = []
    for conversation in PROBE_CONVERSATIONS:
        text = None
        if tokenizer.chat_template:
            try:
                text = tokenizer.apply_chat_template(conversation, tokenize=False)
            except Exception:  # a template with its own rules (roles, system turn): plain text
                text = None
        templated = text is not None  # a template writes its own special tokens
        if not templated:
            text = "\n".join(f"{m['role']}: {m['content']}" for m in conversation)
        batches.append(tokenizer(text, return_tensors="pt", add_special_tokens=not templated,
                                 truncation=True, max_length=PROBE_MAX_TOKENS))
    return batches


def _adapter_digest(run_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        path = run_dir / "adapter" / name
        if path.is_file():
            digest.update(name.encode())
            update_with_file(digest, path)
    return "sha256:" + digest.hexdigest()


def _check_merge_target(out: Path, run_dir: Path, adapter_digest: str) -> None:
    """Refuse, before any model is loaded, to write where a merge must not go."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder for the merged model.")
    if out.is_dir() and any(out.iterdir()):
        try:
            previous = read_merge_record(out)
        except (OSError, ValueError):
            previous = None
        ours = previous is not None and (
            previous.get("run_dir") == str(run_dir.resolve())
            or previous.get("adapter_sha256") == adapter_digest)
        model_files = [p.name for p in out.iterdir()
                       if p.name == "config.json" or p.suffix in (".safetensors", ".bin")]
        if previous is None and model_files:
            raise UserError(
                f"--out {out} holds model files ({', '.join(sorted(model_files)[:3])}) but no "
                f"{MERGE_RECORD}: an interrupted merge by another tool, a copy cut short, or "
                "another model. ftlaunch's own merges are never left half-written there, and it "
                "will not overwrite what it cannot identify; remove that folder (or choose "
                "another --out) and merge again.")
        if not ours:
            raise UserError(
                f"--out {out} exists and is not an earlier merge of {run_dir} (it has no "
                f"{MERGE_RECORD} naming this run). ftlaunch will not overwrite it; choose "
                "another --out or remove that folder.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create {out.parent} ({exc}).") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {out.parent} is not writable; choose another --out.")


def _sibling(out: Path, kind: str) -> Path:
    """A merge's hidden working name beside `out`, owned by this host and process: on a
    shared filesystem another host's merge is never taken for an interrupted one."""
    return out.with_name(f".{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}")


def _recover_interrupted(out: Path) -> None:
    """What a merge on this host killed in _save_atomically left beside `out`: its hidden
    copy, removed; or, killed between the two renames, the earlier merge it had moved
    aside, put back."""
    import psutil

    host = socket.gethostname()
    for pattern in (f".{out.name}.old-{host}-*", f".{out.name}.tmp-{host}-*"):
        for leftover in sorted(out.parent.glob(pattern)):
            pid = leftover.name.rpartition("-")[2]
            if not pid.isdigit() or psutil.pid_exists(int(pid)):
                continue  # not ours, or a merge still running
            if ".old-" in leftover.name and not out.exists():
                leftover.rename(out)
            else:
                shutil.rmtree(leftover, ignore_errors=True)


def _save_atomically(out: Path, model, tokenizer, merge_record: dict) -> None:
    """Save into a hidden sibling, then swap it in: `out` is never half written. An
    earlier merge there is moved aside first and deleted once the new one is in place."""
    tmp, old = _sibling(out, "tmp"), _sibling(out, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / MERGE_RECORD).write_text(json.dumps(merge_record, indent=2) + "\n",
                                        encoding="utf-8")
        filemodes.follow_umask(tmp)  # safetensors wrote the weights 0600
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            if old.exists() and not out.exists():
                old.rename(out)  # put the earlier merge back
            raise
    except OSError as exc:
        raise UserError(f"Writing the merged model to {out} failed ({exc}); nothing was "
                        "replaced.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
