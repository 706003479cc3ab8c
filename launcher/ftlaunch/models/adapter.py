"""A run that starts from an adapter trained before (`--adapter RUN_DIR|PATH`): the usual
SFT -> DPO chain. No torch: the planner reads the adapter's LoRA settings from here.

The adapter is a finished run's adapter/ (RUN_DIR), or any PEFT LoRA adapter folder
(adapter_config.json + adapter_model.safetensors; a run's checkpoints/checkpoint-N is
one). The launcher copies it into the run directory (START_FOLDER) so a resume never
depends on the other run staying where it was; the worker loads that copy twice: once
trainable (the policy, continuing from it) and once frozen as TRL's "ref" adapter (the
reference model: the starting policy, on the same base weights, never a second copy of
them).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ftlaunch.errors import UserError

START_FOLDER = "start-adapter"  # in the run directory
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# LoRA settings the adapter fixes: the recipe's lora section gives way to these.
LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias")


@dataclass(frozen=True)
class StartAdapter:
    given: str  # as the user named it
    folder: Path  # the adapter folder itself
    config: dict  # its adapter_config.json
    fingerprint: str  # sha256 over its config and weights
    note: str | None = None  # what a resume says about it (run_copy)

    @property
    def base(self) -> str:
        return str(self.config.get("base_model_name_or_path") or "")

    def lora_settings(self) -> dict:
        """The adapter's LoRA settings as a recipe's lora section says them; target
        modules by their names in a layer (peft saves every full module path)."""
        settings = {key: self.config[key] for key in LORA_KEYS if key in self.config}
        targets = settings.get("target_modules")
        if isinstance(targets, list):
            settings["target_modules"] = sorted({name.rsplit(".", 1)[-1] for name in targets})
        return settings

    def to_json(self) -> dict:
        return {"given": self.given, "folder": str(self.folder), "fingerprint": self.fingerprint}


def run_copy(given: str, output_dir: Path) -> StartAdapter | None:
    """The copy a run in `output_dir` started from (START_FOLDER), if it has one: a
    resume goes on from it whatever became of `given` since (moved, deleted, trained
    further); the note says when `given` is no longer what the run started from."""
    copy = output_dir / START_FOLDER
    if not (copy / CONFIG).is_file() or not (copy / WEIGHTS).is_file():
        return None
    started = resolve(str(copy))
    note = None
    try:
        source = resolve(given)
    except UserError:
        note = f"--adapter {given} is gone or incomplete"
    else:
        if source.fingerprint != started.fingerprint:
            note = f"--adapter {given} changed since this run started from it"
    if note:
        note += (f"; the run goes on from its own copy, {copy} (--fresh starts over from "
                 f"{given} as it is now)")
    return StartAdapter(given=given, folder=started.folder, config=started.config,
                        fingerprint=started.fingerprint, note=note)


def resolve(given: str) -> StartAdapter:
    """The adapter `given` names, checked; a UserError says what is missing."""
    path = Path(given).expanduser()
    if not path.is_dir():
        raise UserError(f"--adapter {given}: no such folder. Give a finished ftlaunch run "
                        "directory (its adapter/ is used) or a LoRA adapter folder "
                        f"({CONFIG} and {WEIGHTS}).")
    folder = path / "adapter" if (path / "run.yaml").is_file() else path
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        if folder != path:
            raise UserError(f"--adapter {given}: this run has no finished adapter ({folder} "
                            "is missing or incomplete). Let it finish (re-run its command), "
                            "or give one of its checkpoints: --adapter "
                            f"{path / 'checkpoints'}/checkpoint-N (a single-process, DDP or "
                            "ZeRO-3 run's; FSDP's are sharded and hold no adapter file).")
        raise UserError(f"--adapter {given}: not a LoRA adapter folder; it needs {CONFIG} "
                        f"and {WEIGHTS} (what peft's save_pretrained writes).")
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--adapter {given}: {folder / CONFIG} cannot be read: {exc}.") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise UserError(f"--adapter {given}: {folder / CONFIG} is not a LoRA adapter's config "
                        f"(peft_type {config.get('peft_type') if isinstance(config, dict) else None!r}); "
                        "ftlaunch continues LoRA adapters only.")
    return StartAdapter(given=given, folder=folder.resolve(), config=config,
                        fingerprint=fingerprint(folder))


def fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        with open(folder / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def check_base(adapter: StartAdapter, names: tuple[str, ...]) -> None:
    """The adapter was trained on the model this run loads (`names`: the model's preset
    name, source and the folder or hub id it loads from). The same model at another path
    matches by its folder name (a hub cache's models--org--name, a copied folder)."""
    base = adapter.base
    if not base:
        return
    def tail(text: str) -> str:
        return Path(text.rstrip("/")).name.replace("models--", "").replace("--", "/")

    if any(base == name or tail(base) == tail(name) or base.endswith("/" + name)
           for name in names if name):
        return
    raise UserError(f"--adapter {adapter.given} was trained on {base}, but this run loads "
                    f"{names[-1]}. Give --model the adapter's base model: a LoRA adapter only "
                    "fits the weights it was trained on.")
