"""A finished run's parts, loaded for export: its base model (models.load, as training
loaded it but unquantised), the tokenizer saved with the adapter, the adapter."""

from __future__ import annotations

from pathlib import Path

from ftlaunch.errors import UserError
from ftlaunch.models.load import load_base_model
from ftlaunch.run import directory as rundir
from ftlaunch.run import record as run_record


def load_adapted(run_dir: Path, with_adapter: bool = True):
    """(model with adapter, tokenizer) from a finished run, on CPU or the first GPU.

    with_adapter=False gives the base model alone, to compare before and after."""
    run_dir = Path(run_dir)
    record = finished_record(run_dir)
    device, dtype = device_and_dtype()
    model = load_base(record, dtype)
    if with_adapter:
        model = apply_adapter(model, run_dir)
    return model.to(device).eval(), load_tokenizer(run_dir, record)


def load_base(record: run_record.RunRecord, dtype):
    """The run's base model, unquantised and in `dtype`, on CPU.

    A QLoRA run trained against 4-bit weights, but what is loaded here is always the
    16/32-bit checkpoint at record.model.load_from; a --random-init run's base is
    rebuilt from its config with the run's seed, exactly as training built it."""
    return load_base_model(record.model, dtype, seed=record.seed)


def finished_record(run_dir: Path) -> run_record.RunRecord:
    """The record of a run directory whose training finished (it has its adapter); a
    UserError says what `run_dir` is instead."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} does not exist or is not a run directory; pass the "
                        "--output-dir of a finished training.")
    if not run_record.exists(run_dir):
        raise UserError(f"{run_dir} is not an ftlaunch run directory (it has no "
                        f"{rundir.RUN_FILE}); pass the --output-dir of a finished training.")
    if not rundir.is_finished(run_dir):
        raise UserError(f"{run_dir} has no finished adapter yet (no {run_dir / 'adapter'}); "
                        "finish or resume the training first.")
    return run_record.load(run_dir)


def device_and_dtype():
    """Where and in what export runs: ("cuda", bf16) where there is a GPU, else
    ("cpu", fp32)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def apply_adapter(base, run_dir: Path):
    """`base` with the run's adapter (RUN_DIR/adapter) applied, not merged (PEFT)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(run_dir / "adapter"))


def load_tokenizer(run_dir: Path, record: run_record.RunRecord):
    """The tokenizer saved with the adapter (with the chat template training used)."""
    from ftlaunch.data import tokenize

    tokenizer, _ = tokenize.load_tokenizer(record.model.with_tokenizer(run_dir / "adapter"),
                                          assistant_only=False)
    return tokenizer
