"""Everything a worker does before trainer.train(): the run record read, the tokenizer,
the data cache, the base model (and a starting adapter), TRL's SFTTrainer, DPOTrainer or
KTOTrainer with ftlaunch's callbacks (build). Tests use build to inspect the real
batches."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ftlaunch.data import tokenize
from ftlaunch.errors import UserError
from ftlaunch.models.load import load_base_model, precision_dtype
from ftlaunch.models.source import ModelSource
from ftlaunch.run import checkpoints
from ftlaunch.run import directory as rundir
from ftlaunch.run import record as run_record
from ftlaunch.worker import fsdp_checkpoint
from ftlaunch.worker import fsdp_cpu
from ftlaunch.worker.callbacks import BatchRecorder, Heartbeat, MetricsCallback, ResumedSettings
from ftlaunch.worker.checkpointing import Checkpointing
from ftlaunch.worker.stopping import NonFiniteGuard, StopRequest

# Where precomputed reference log-probs are kept (trainer_class), in the run directory.
REFERENCE_FOLDER = "reference-logps"


def _trl_class(objective: str, suffix: str):
    """TRL's Config or Trainer class of the run record's objective: TRL names them after
    it (SFTConfig, DPOTrainer, KTOTrainer), as plan.objectives.Objective.config does."""
    import trl

    return getattr(trl, objective.upper() + suffix)


@dataclasses.dataclass
class Session:
    """A trainer ready to train, with what the run needs around it."""
    trainer: object
    recorder: BatchRecorder
    tokenizer: object
    checkpointing: Checkpointing
    heartbeat: Heartbeat


def build(run_dir: Path, stop: StopRequest | None = None) -> Session:
    """Everything up to trainer.train(): also how tests inspect the real batches."""
    record = run_record.load(run_dir)
    strategy = record.strategy
    fsdp_on_cpu = strategy.on_cpu and strategy.engine == "fsdp"
    if strategy.engine == "fsdp":
        fsdp_checkpoint.enable()  # or resume would lose the adapter and AdamW's state
    if fsdp_on_cpu:
        _adapt_fsdp_to_cpu(fsdp_cpu.enable)
    train_set, eval_set = _load_datasets(run_dir, record)
    # The training arguments come before the model: under DeepSpeed ZeRO-3 they are what
    # makes from_pretrained build the model already partitioned (zero.Init).
    config = training_config(run_dir, record)
    # The training template (generation markers) also goes out with the adapter.
    tokenizer = _load_tokenizer(record.model,
                                tokenize.assistant_only(record.data.kind, record.data_options),
                                record.data.kind)
    dtype = precision_dtype(record.strategy.precision)
    model = load_base_model(record.model, dtype,
                            quantize_4bit=record.strategy.method == "qlora",
                            seed=record.seed, for_training=True)
    if strategy.start_adapter:
        model = _with_start_adapter(model, run_dir)
    trainer, recorder = _build_trainer(run_dir, config, record.lora, model, tokenizer,
                                       train_set, eval_set, strategy.objective, dtype)
    if fsdp_on_cpu:
        _adapt_fsdp_to_cpu(lambda: fsdp_cpu.check(trainer))
        fsdp_cpu.keep_4bit_weights_flat(trainer.model)
    _check_world(trainer.args, strategy)
    stop = stop or StopRequest()
    # Gradients the guard can act on before the optimizer steps: not DeepSpeed's (its
    # engine steps inside backward), not fp16's (an inf gradient under the GradScaler is
    # routine: the scaler skips that step and lowers the scale).
    guard = NonFiniteGuard(stop, checks_gradients=not trainer.is_deepspeed_enabled
                            and getattr(trainer.accelerator, "scaler", None) is None)
    checkpointing = Checkpointing(run_dir, record, stop, guard)
    heartbeat = Heartbeat(run_dir)
    trainer.add_callback(guard)  # before Checkpointing: its agreement sees the guard's finding
    trainer.add_callback(checkpointing)
    trainer.add_callback(heartbeat)
    trainer.add_callback(ResumedSettings())
    return Session(trainer, recorder, tokenizer, checkpointing, heartbeat)


def _check_world(args, strategy) -> None:
    """The processes that started are the plan's: a launch that gave each process a world
    of its own (accelerate's MULTI_CPU type does this silently) would train N copies, each
    with another global batch than the checkpoints and the schedule are made for."""
    if args.world_size != strategy.world_size:
        raise RuntimeError(f"this worker sees a world of {args.world_size} processes; the plan "
                           f"has {strategy.world_size}. The launch did not start the plan's job.")


def _adapt_fsdp_to_cpu(step) -> None:
    try:
        step()
    except fsdp_cpu.Unadaptable as exc:
        raise UserError(fsdp_cpu.message(exc)) from None


def _load_tokenizer(model: ModelSource, assistant_only: bool, kind: str):
    tokenizer, template = tokenize.load_tokenizer(model, assistant_only, kind)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if template and int(os.environ.get("RANK", "0")) == 0:
        print(f"ftlaunch: chat template: {template}", flush=True)
    return tokenizer


def _load_datasets(run_dir: Path, record: run_record.RunRecord):
    """(train, eval or None) from the data cache the launcher tokenized and split
    (ftlaunch.data.cache): no rank tokenizes, and every rank reads the same rows."""
    from ftlaunch.data import cache as data_cache

    if record.trainer is None:  # only a record from before schema 1 has none
        raise UserError(f"{run_dir / rundir.RUN_FILE} was written by an older ftlaunch; re-run "
                        "the ftlaunch command of this run (or `ftlaunch resume "
                        f"{run_dir}`): it rewrites run.yaml before starting the workers.")
    if record.data.cache is None:
        raise UserError(f"{run_dir / rundir.RUN_FILE} names no data cache: it was written by "
                        "`ftlaunch --dry-run`. Start the run with the same ftlaunch command "
                        "without --dry-run; it tokenizes the data first.")
    return data_cache.load(run_dir / data_cache.DIRECTORY, record.data.cache["fingerprint"])


def training_config(run_dir: Path, record: run_record.RunRecord):
    """TRL's SFTConfig, DPOConfig or KTOConfig (the run's objective): the arguments the
    launcher resolved into the run record (plan.trainer_args), writing into the run's
    checkpoint staging area."""
    config_class = _trl_class(record.strategy.objective, "Config")
    config = config_class(
        # The Trainer writes into the staging area; Checkpointing moves each checkpoint
        # into checkpoints/ once it is complete.
        output_dir=str(run_dir / "checkpoints" / checkpoints.INCOMING),
        **own_checkpointing_names(record.trainer, config_class))
    # Trackers' local files belong to the run (transformers 5 reads these, not logging_dir).
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    return config


def own_checkpointing_names(arguments: dict, config_class) -> dict:
    """transformers 5.2x renamed gradient_checkpointing to activation_checkpointing. The
    launcher names it as its own transformers does (plan.trainer_args); on a node of a
    multi-node job with the other version the worker uses its own library's name."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(config_class)}
    renamed = dict(arguments)
    for old, new in (("gradient", "activation"), ("activation", "gradient")):
        for suffix in ("_checkpointing", "_checkpointing_kwargs"):
            if old + suffix in renamed and old + suffix not in fields and new + suffix in fields:
                renamed[new + suffix] = renamed.pop(old + suffix)
    return renamed


def _with_start_adapter(model, run_dir: Path):
    """The base with the run's starting adapter (models.adapter), trainable: the policy
    continues from it. DPOTrainer and KTOTrainer (TRL 1.16) copy it into a frozen "ref"
    adapter before training, its reference for a re-trained adapter: the starting policy,
    on the same base weights. A resume from a trainer-format checkpoint reloads both from it (its ref/
    holds that same frozen copy); FSDP's sharded checkpoints hold every parameter."""
    from peft import PeftModel

    from ftlaunch.models.adapter import START_FOLDER

    return PeftModel.from_pretrained(model, str(run_dir / START_FOLDER), is_trainable=True)


def _build_trainer(run_dir, config, lora_settings: dict, model, tokenizer, train_set, eval_set,
                   objective: str, dtype):
    from peft import LoraConfig, PeftModel
    from transformers import PrinterCallback

    # A model that already has its adapter (--adapter) gets no second one.
    lora = (None if isinstance(model, PeftModel)
            else LoraConfig(task_type="CAUSAL_LM", **lora_settings))
    callback = MetricsCallback(run_dir / "metrics.jsonl")
    trainer = trainer_class(objective, run_dir)(
        model=model, args=config, train_dataset=train_set, eval_dataset=eval_set,
        processing_class=tokenizer, peft_config=lora, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # MetricsCallback prints one readable line instead
    _adapter_in_fp32(trainer.model, fsdp_precision=dtype if trainer.is_fsdp_enabled else None)
    # Wrapped after construction: TRL refuses a custom collator with padding-free packing.
    recorder = BatchRecorder(trainer.data_collator)
    trainer.data_collator = recorder
    callback.recorder = recorder
    return trainer, recorder


def trainer_class(objective: str, run_dir: Path | None = None):
    """The run objective's trainer class. SFT: TRL's SFTTrainer, which takes the cached
    input_ids and labels as they are. DPO, KTO: TRL's DPOTrainer or KTOTrainer on the
    launcher's tokenized examples (data.preference): their _prepare_dataset would extract
    prompts and tokenize again, so only its last steps are kept, on the cached columns:

    - examples whose prompt alone fills max_length are left out (keep_start truncation
      would leave them no completion token); the launcher counted them in its notes;
    - KTO: the examples are shuffled once with the run's seed (KTOTrainer samples them in
      order, so its KL completions stay its neighbours'; held-out ones too, so an
      evaluation batch of pairs unpaired likely holds both labels, not a block of one),
      and each gets its KL completion: the completions of its block of per_device_train_batch_size
      rotated by one, as KTOTrainer makes them.

    In memory: every rank makes its own view, none writes beside the cache. So TRL's
    precomputed reference log-probs (precompute_ref_log_probs), which rank 0 writes beside
    the dataset's files for every rank to read back, go to the run's REFERENCE_FOLDER
    instead: a dataset made in memory has no files, and each rank would look in a
    temporary folder of its own."""
    if objective == "sft":
        return _trl_class(objective, "Trainer")

    class OnCachedExamples(_trl_class(objective, "Trainer")):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if args.max_length is not None and getattr(args, "truncation_mode",
                                                       "keep_start") == "keep_start":
                dataset = dataset.filter(lambda prompt: len(prompt) < args.max_length,
                                         input_columns=["prompt_ids"], keep_in_memory=True,
                                         desc=f"Dropping fully truncated {dataset_name} examples")
            if objective != "kto":
                return dataset
            dataset = dataset.shuffle(seed=args.seed, keep_in_memory=True)
            if self.calculate_KL:
                dataset = dataset.map(
                    lambda completions: {"KL_completion_ids": completions[-1:] + completions[:-1]},
                    input_columns=["completion_ids"], batched=True,
                    batch_size=args.per_device_train_batch_size, keep_in_memory=True,
                    desc=f"KL completions of the {dataset_name} examples")
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if run_dir is not None:
                folder = run_dir / REFERENCE_FOLDER
                folder.mkdir(exist_ok=True)
                dataset._get_cache_file_path = (  # noqa: B023 (one dataset per call)
                    lambda fingerprint: str(folder / f"{name}-{fingerprint}.arrow"))
            return super()._precompute_ref_logps(dataset, name, batch_size)

    return OnCachedExamples


def _adapter_in_fp32(model, fsdp_precision=None) -> None:
    """Trainable (LoRA) weights in fp32, as PEFT makes them, for QLoRA too.

    TRL casts a quantized model's LoRA weights to bf16 whatever the compute dtype. The
    plan counts them in fp32 (memory.Stack.adapter_bytes: their gradients and AdamW
    moments too), fp32 moments keep small updates, and under FSDP the wrapper computes
    in the 4-bit storage dtype: a bf16 adapter beside an fp32 one fails on CPU ("expected
    m1 and m2 to have the same dtype"). The cost is 2 bytes per adapter weight."""
    import torch

    for name, param in model.named_parameters():
        if ".ref." in name:
            # The frozen reference adapter (a copy of the starting one). fp32 as the
            # policy, so both score the same weights alike; but FSDP flattens frozen leaves
            # into their layer's unit with the base weights, which must share one dtype:
            # there it takes the base's (FSDP computes in that dtype anyway).
            param.data = param.data.to(fsdp_precision or torch.float32)
        elif param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
