"""The shared SFT module every strategy launches: `python -m ftlaunch.worker.main --run-dir DIR`.

It is the only place that touches the Trainer. Everything it needs was
decided and validated by the launcher and written to run.yaml; a worker only
reads it, so all ranks train the same thing and no rank can disagree about
the plan. Rank 0 writes the run files; every rank writes one line about
itself in ranks/, which is how tests see that all ranks trained together.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from ftlaunch.quiet import silence_library_noise

from transformers import TrainerCallback

from ftlaunch import filemodes
from ftlaunch.run import checkpoints
from ftlaunch.worker import fsdp_checkpoint
from ftlaunch.worker import fsdp_cpu
from ftlaunch.worker import peak_memory
from ftlaunch.data import tokenize as preview
from ftlaunch.run import rank_logs
from ftlaunch.show.progress import progress_line
from ftlaunch.run import resume_rules as resume_changes
from ftlaunch.run import directory as rundir
from ftlaunch.worker import shard_report
from ftlaunch.run import heartbeat as heartbeat_mod
from ftlaunch.run import record as run_record
from ftlaunch.models.load import load_base_model, precision_dtype
from ftlaunch.models.source import ModelSource
from ftlaunch.files import atomic_write
from ftlaunch.errors import UserError, exit_quickly


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftlaunch.worker.main")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--resume-from", type=Path, default=None)
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    rank_logs.prepare(run_dir)
    silence_library_noise()
    try:
        run(run_dir, args.resume_from)
    except BaseException as exc:
        code = rank_logs.fail(run_dir, exc)  # recorded; a full disk or a peer's fault told in one line
        if code is None:
            raise
        return code
    return 0


@dataclasses.dataclass
class Session:
    """A trainer ready to train, with what the run needs around it."""
    trainer: object
    recorder: "_BatchRecorder"
    tokenizer: object
    checkpointing: "_Checkpointing"
    heartbeat: "_Heartbeat"


def build(run_dir: Path, stop: "_StopRequest | None" = None) -> Session:
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
                                preview.assistant_only(record.data.kind, record.data_options))
    model = load_base_model(record.model, precision_dtype(record.strategy.precision),
                            quantize_4bit=record.strategy.method == "qlora",
                            seed=record.seed, for_training=True)
    trainer, recorder = _build_trainer(run_dir, config, record.lora, model, tokenizer,
                                       train_set, eval_set)
    if fsdp_on_cpu:
        _adapt_fsdp_to_cpu(lambda: fsdp_cpu.check(trainer))
    stop = stop or _StopRequest()
    # Gradients the guard can act on before the optimizer steps: not DeepSpeed's (its
    # engine steps inside backward), not fp16's (an inf gradient under the GradScaler is
    # routine: the scaler skips that step and lowers the scale).
    guard = _NonFiniteGuard(stop, checks_gradients=not trainer.is_deepspeed_enabled
                            and getattr(trainer.accelerator, "scaler", None) is None)
    checkpointing = _Checkpointing(run_dir, record, stop, guard)
    heartbeat = _Heartbeat(run_dir)
    trainer.add_callback(guard)  # before _Checkpointing: its agreement sees the guard's finding
    trainer.add_callback(checkpointing)
    trainer.add_callback(heartbeat)
    trainer.add_callback(_ResumedSettings())
    return Session(trainer, recorder, tokenizer, checkpointing, heartbeat)


def _adapt_fsdp_to_cpu(step) -> None:
    try:
        step()
    except fsdp_cpu.Unadaptable as exc:
        raise UserError(fsdp_cpu.message(exc)) from None


def run(run_dir: Path, resume_from: Path | None) -> None:
    stop = _StopRequest()
    stop.install()  # first thing: a signal during model loading must not kill this rank
    import faulthandler

    # The launcher asks for every thread's stack this way when the job stalls; it is
    # written from the signal handler itself, so even a rank stuck in C code answers.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    record = run_record.load(run_dir)
    _watch_launcher(stop, float(record.checkpointing.grace_s))
    session = build(run_dir, stop)
    trainer, recorder, tokenizer = session.trainer, session.recorder, session.tokenizer
    if trainer.is_world_process_zero():  # a run killed before its first checkpoint starts over
        _trim_metrics(run_dir / "metrics.jsonl", checkpoints.step_of(resume_from) if resume_from else 0)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    # Who writes the run directory's files: global rank 0, or with node-local run
    # directories every node's first rank (save_on_each_node), each into its own copy.
    writes_run_files = trainer.args.should_save
    stopped_at = session.checkpointing.stopped_at
    if stopped_at is None and stop.reason == rundir.NON_FINITE_STOP:
        stopped_at = trainer.state.global_step  # found in the last step's logged loss
    if stopped_at is not None:  # the stop's checkpoint is complete: on_save waited for all ranks
        if writes_run_files:
            checkpoints.clear_incoming(run_dir / "checkpoints")
            _record_stop(run_dir, stop, stopped_at, session.checkpointing.guard)
        # No node's launcher may look for stopped.json before it is there.
        _barrier()
        return
    session.heartbeat.beat(trainer.args, trainer.state, heartbeat_mod.FINISHING)

    _write_rank_report(run_dir, trainer, recorder, result, time.time() - started)
    evaluated = {row["step"] for row in trainer.state.log_history if "eval_loss" in row}
    if trainer.eval_dataset is not None and trainer.state.global_step not in evaluated:
        trainer.evaluate()  # the final adapter's eval loss, logged like the others
    _save_adapter(trainer, tokenizer, run_dir / "adapter")
    trainer.accelerator.wait_for_everyone()
    if writes_run_files:
        checkpoints.clear_incoming(run_dir / "checkpoints")  # only TRL's model card is left there
    if trainer.is_world_process_zero():
        from ftlaunch.show.plot import run_title, write_loss_png

        try:
            write_loss_png(run_dir / "metrics.jsonl", run_dir / "loss.png",
                           title=run_title(record.model.name, record.strategy))
        except Exception as exc:  # a picture is not worth failing a finished training for
            print(f"ftlaunch: could not write loss.png: {exc}", flush=True)
        print(f"ftlaunch: training finished, adapter in {run_dir / 'adapter'}", flush=True)


def _load_tokenizer(model: ModelSource, assistant_only: bool):
    tokenizer, template = preview.load_tokenizer(model, assistant_only)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if template and int(os.environ.get("RANK", "0")) == 0:
        print(f"ftlaunch: chat template: {template}", flush=True)
    return tokenizer


def _load_datasets(run_dir: Path, record: run_record.RunRecord):
    """(train, eval or None) from the data cache the launcher tokenized and split
    (ftlaunch.data.cache): no rank tokenizes, and every rank reads the same rows."""
    from ftlaunch.data import cache as data_cache

    if record.data.cache is None or record.trainer is None:
        raise UserError(f"{run_dir / rundir.RUN_FILE} names no data cache: it was written by "
                        "`ftlaunch --dry-run`. Start the run with the same ftlaunch command "
                        "without --dry-run; it tokenizes the data first.")
    return data_cache.load(run_dir / data_cache.DIRECTORY, record.data.cache["fingerprint"])


def training_config(run_dir: Path, record: run_record.RunRecord):
    """TRL's SFTConfig: the arguments the launcher resolved into the run record
    (plan.trainer_args), writing into the run's checkpoint staging area."""
    from trl import SFTConfig

    config = SFTConfig(
        # The Trainer writes into the staging area; _Checkpointing moves each checkpoint
        # into checkpoints/ once it is complete.
        output_dir=str(run_dir / "checkpoints" / checkpoints.INCOMING),
        **record.trainer)
    # Trackers' local files belong to the run (transformers 5 reads these, not logging_dir).
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    return config


def _build_trainer(run_dir, config, lora_settings: dict, model, tokenizer, train_set, eval_set):
    from peft import LoraConfig
    from transformers import PrinterCallback
    from trl import SFTTrainer

    lora = LoraConfig(task_type="CAUSAL_LM", **lora_settings)
    callback = _MetricsCallback(run_dir / "metrics.jsonl")
    trainer = SFTTrainer(model=model, args=config, train_dataset=train_set,
                         eval_dataset=eval_set, processing_class=tokenizer, peft_config=lora,
                         callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # _MetricsCallback prints one readable line instead
    _adapter_in_fp32(trainer.model)
    # Wrapped after construction: TRL refuses a custom collator with padding-free packing.
    recorder = _BatchRecorder(trainer.data_collator)
    trainer.data_collator = recorder
    callback.recorder = recorder
    return trainer, recorder


def _adapter_in_fp32(model) -> None:
    """Trainable (LoRA) weights in fp32, as PEFT makes them, for QLoRA too.

    TRL casts a quantized model's LoRA weights to bf16 whatever the compute dtype. The
    plan counts them in fp32 (memory.Stack.adapter_bytes: their gradients and AdamW
    moments too), fp32 moments keep small updates, and under FSDP the wrapper computes
    in the 4-bit storage dtype: a bf16 adapter beside an fp32 one fails on CPU ("expected
    m1 and m2 to have the same dtype"). The cost is 2 bytes per adapter weight."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


class _MetricsCallback(TrainerCallback):
    """metrics.jsonl on rank 0, one line per logged step (and per evaluation), and a
    readable line on stdout.

    trained_tokens_per_s: tokens with a label (the ones the loss is on) per second,
    over all ranks: TRL's num_tokens (input tokens, summed over ranks) times the
    labelled fraction of the batches this rank collated. (Counting at collation
    alone would be early by the batch the dataloader prefetches.)
    """

    def __init__(self, path: Path):
        self.path = path
        self.recorder = None
        self._since = (time.time(), 0)
        self._began = (time.time(), 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self._since = (time.time(), 0.0)
        self._began = (time.time(), state.global_step)  # a resume starts mid-way
        peak_memory.reset()  # the peaks logged are training's, not loading's

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" not in logs and "eval_loss" not in logs:
            return
        now = time.time()
        row = {"step": state.global_step, "time": round(now, 3)}
        row.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
        if "loss" in logs:
            then, tokens_then = self._since
            tokens = float(logs.get("num_tokens", 0.0))
            recorder = self.recorder
            fraction = recorder.trained_tokens / recorder.tokens if recorder and recorder.tokens else 0
            if now > then and tokens > tokens_then:
                row["tokens_per_s"] = round((tokens - tokens_then) / (now - then), 1)
                row["trained_tokens_per_s"] = round((tokens - tokens_then) * fraction
                                                    / (now - then), 1)
            self._since = (now, tokens)
            row.update(peak_memory.read())
            line = progress_line(state.global_step, state.max_steps, logs["loss"],
                                 logs.get("learning_rate", 0), row.get("tokens_per_s"),
                                 now - self._began[0], state.global_step - self._began[1])
        else:
            row["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
            line = (f"step {state.global_step}/{state.max_steps}  eval loss "
                    f"{logs['eval_loss']:.4f}  perplexity {row['eval_perplexity']:.2f}")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(line, flush=True)


class _Heartbeat(TrainerCallback):
    """This rank's progress for the launcher's stall watch (ftlaunch.run.heartbeat)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.writer = None

    def beat(self, args, state, phase: str = "training") -> None:
        if self.writer is None:
            self.writer = heartbeat_mod.Writer(self.run_dir, args.process_index)
        self.writer.beat(state.global_step, phase)

    def on_train_begin(self, args, state, control, **kwargs):
        self.beat(args, state)

    def on_step_end(self, args, state, control, **kwargs):
        self.beat(args, state)

    def on_substep_end(self, args, state, control, **kwargs):  # a micro-batch of accumulation
        self.beat(args, state)

    def on_prediction_step(self, args, state, control, **kwargs):
        self.beat(args, state, "evaluating")

    def on_save(self, args, state, control, **kwargs):
        self.beat(args, state)


class _BatchRecorder:
    """Wraps the collator to fingerprint the batches this rank trained on."""

    def __init__(self, collator):
        self.collator = collator
        self.digest = hashlib.sha256()
        self.batches = 0
        self.tokens = 0
        self.trained_tokens = 0

    def __call__(self, features):
        batch = self.collator(features)
        ids = batch["input_ids"]
        self.digest.update(ids.cpu().numpy().tobytes())
        self.batches += 1
        self.tokens += int(ids.numel())
        self.trained_tokens += int((batch["labels"] != -100).sum())
        return batch


def _is_zero3(trainer) -> bool:
    """DeepSpeed partitions the parameters (ZeRO-3 tags each with a ds_id)."""
    return trainer.is_deepspeed_enabled and any(hasattr(p, "ds_id")
                                                for p in trainer.model.parameters())


def _adapter_checksum(trainer) -> str:
    """A digest of the trained adapter, the same on every rank when the ranks agree.

    Collective under ZeRO-3 and FSDP (every rank must call it): ZeRO-3 partitions the
    LoRA weights, so they are gathered first (only the trainable ones, a few MB); FSDP
    keeps each rank's shard of them, so the shards' digests are gathered and hashed in
    rank order.
    """
    model = trainer.model
    trainable = [(n, p) for n, p in sorted(model.named_parameters()) if p.requires_grad]
    if _is_zero3(trainer):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
            return _digest(trainable)
    if trainer.is_fsdp_enabled and trainer.args.world_size > 1:
        import torch.distributed as dist

        shards: list = [None] * trainer.args.world_size
        dist.all_gather_object(shards, _digest(trainable))
        return hashlib.sha256("".join(shards).encode()).hexdigest()
    return _digest(trainable)


def _base_weights(model) -> str:
    """What the frozen base is stored as: "nf4" for QLoRA, else its dtype."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is not None and type(weight).__name__ == "Params4bit":
            # FSDP's flat parameters drop the weight's quant_state; bitsandbytes keeps a copy
            # on the module and puts it back at each forward.
            state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
            return state.quant_type if state is not None else weight.quant_type
    for param in model.parameters():
        if not param.requires_grad:
            return str(param.dtype).replace("torch.", "")
    return "unknown"


def _digest(named_params) -> str:
    digest = hashlib.sha256()
    for name, param in named_params:
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _write_rank_report(run_dir, trainer, recorder, result, seconds):
    import torch.distributed as dist

    state = trainer.state
    report = {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
        "pid": os.getpid(),
        "global_step": state.global_step,
        "batches": recorder.batches,
        "tokens": recorder.tokens,
        "data_digest": recorder.digest.hexdigest(),
        "adapter_checksum": _adapter_checksum(trainer),
        "base_weights": _base_weights(trainer.model),
        "sharding": shard_report.describe(trainer),
        "peak_memory": peak_memory.read(),
        "train_loss": result.training_loss,
        "seconds": round(seconds, 2),
    }
    ranks = run_dir / rundir.RANKS_DIR
    ranks.mkdir(exist_ok=True)
    (ranks / f"rank-{report['rank']}.json").write_text(json.dumps(report) + "\n", encoding="utf-8")


def _save_adapter(trainer, tokenizer, target: Path) -> None:
    """Every rank calls this; rank 0 writes.

    Written beside and renamed: a run counts as finished only when adapter/ is whole.
    Collecting the adapter is collective on sharded engines, so every rank takes part:
    ZeRO-3 through the Trainer's save_model (stage3_gather_16bit_weights_on_model_save
    gathers the trainable weights), FSDP through fsdp_checkpoint.save_adapter (a full
    state dict gathered unit by unit; checkpoints are SHARDED_STATE_DICT, the adapter
    file must be whole).
    """
    staging = target.with_name(".adapter.tmp")
    main = trainer.args.should_save  # rank 0, or each node's first with node-local run dirs
    if trainer.is_fsdp_enabled:
        # Gathered whole on global rank 0 only (ftlaunch refuses FSDP with node-local
        # run directories, so no other node writes one).
        fsdp_checkpoint.save_adapter(trainer.model_wrapped,
                                     trainer.accelerator.unwrap_model(trainer.model_wrapped),
                                     staging, write=trainer.is_world_process_zero())
        main = trainer.is_world_process_zero()
    elif _is_zero3(trainer):
        trainer.save_model(str(staging))
        if main:
            (staging / "training_args.bin").unlink(missing_ok=True)
    elif main:
        trainer.model.save_pretrained(staging)
    if not main:
        return
    tokenizer.save_pretrained(staging)
    filemodes.follow_umask(staging)  # safetensors wrote the weights 0600
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint: those steps run again. A line
    cut short by a hard kill is dropped too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write(path, "".join(line + "\n" for line in kept))


NON_FINITE = rundir.NON_FINITE_STOP


def _record_stop(run_dir: Path, stop: "_StopRequest", step: int,
                 guard: "_NonFiniteGuard") -> None:
    """stopped.json, which tells the launcher why the workers ended before max_steps and
    which complete checkpoint holds the state to go on from: the stop's own, or (when the
    weights at the stop were not worth saving) the last one before it."""
    newest = checkpoints.scan(run_dir / "checkpoints").newest
    record = {"step": step, "why": stop.reason,
              "checkpoint": str(newest.path) if newest else None}
    if stop.reason == NON_FINITE:
        record.update(guard.report())
    rundir.write_stop_record(run_dir, record)
    where = f"{newest.path.name} is complete" if newest else "no checkpoint was completed"
    print(f"ftlaunch: stopped ({stop.reason}) at step {step}; {where}", flush=True)


class _ResumedSettings(TrainerCallback):
    """On resume, the settings the checkpoint's state would override (see
    ftlaunch.run.resume_rules.take_effect). on_train_begin runs after the Trainer has loaded
    the checkpoint's optimizer, scheduler and trainer state, so the new values win."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if state.global_step == 0:
            return  # a new run: nothing was restored
        note = resume_changes.take_effect(args, state, optimizer, lr_scheduler)
        if note and state.is_world_process_zero:
            print(f"ftlaunch: {note}", flush=True)


class _NonFiniteGuard(TrainerCallback):
    """A NaN or inf loss stops the run before it poisons the weights.

    Before each optimizer step this rank's trainable gradients (LoRA's, a few MB) are
    checked; _Checkpointing's per-step agreement carries the finding to every rank, and
    when any rank found one, every rank drops its gradients (skip_update), so the
    optimizer skips that update (torch's optimizers skip parameters without a gradient),
    and the run stops with a checkpoint of the weights as they were before it: the last
    good state. Where the gradients cannot be acted on (checks_gradients False: DeepSpeed,
    fp16) the logged loss is checked instead, and the run stops without saving: the last
    complete checkpoint is then the last good state."""

    def __init__(self, stop: "_StopRequest", checks_gradients: bool = True):
        self.stop = stop
        self.checks_gradients = checks_gradients
        self.step: int | None = None
        self.kept_good = False  # the update was skipped: the current weights are good
        self.found_in = ""
        self._params: list = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._params = [p for p in model.parameters() if p.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.checks_gradients or self.step is not None:
            return
        import torch

        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                 for p in self._params if p.grad is not None]
        # One reduction and one device sync for all of them, not one per tensor.
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            self._trip(state.global_step + 1, "gradients")

    def skip_update(self, step: int) -> None:
        """Every rank, once the ranks agreed that some rank's gradients are not finite."""
        for param in self._params:
            param.grad = None
        if self.step is None:
            self._trip(step, "gradients")  # another rank's shard was the one
        self.kept_good = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")  # gathered over the ranks: every rank sees it
        if isinstance(loss, (int, float)) and not math.isfinite(loss) and self.step is None:
            self._trip(state.global_step, "logged loss")
            # The save and evaluation that follow this log in the same step would keep or
            # judge weights that the bad update has already reached.
            control.should_save = control.should_evaluate = False
            return control

    def _trip(self, step: int, found_in: str) -> None:
        self.step, self.found_in = step, found_in
        self.stop.request(NON_FINITE)

    def report(self) -> dict:
        return {"non_finite_step": self.step, "found_in": self.found_in,
                "update_skipped": self.kept_good}


class _StopRequest:
    """SIGTERM / SIGINT on this rank: finish the step, checkpoint, stop (see _Checkpointing).

    Later signals are ignored here: torchrun's agent forwards the scheduler's signal
    again, and the launcher is the one that turns a second signal into a hard stop.
    The reason is a small number so that the ranks can agree on it with a max-reduce.
    """

    REASONS = (None, "SIGINT", "SIGTERM", "launcher exited", NON_FINITE)

    def __init__(self):
        self.code = 0

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        # The later reason wins, as between ranks (the max-reduce in _Checkpointing._agree):
        # a non-finite loss, the highest, decides how the stop saves.
        self.code = max(self.code, self.REASONS.index(reason))

    @property
    def reason(self) -> str | None:
        return self.REASONS[self.code]


def _watch_launcher(stop: _StopRequest, grace_s: float) -> None:
    """If the launcher dies without stopping us (SIGKILL, OOM killer), stop like on a
    signal: checkpoint at the next step; exit anyway after the grace period."""
    pid = int(os.environ.get("FTLAUNCH_LAUNCHER_PID", "0") or 0)
    if not pid:
        return
    import psutil

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    def watch() -> None:
        while not gone():
            time.sleep(2)
        stop.request("launcher exited")
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="ftlaunch-watchdog", daemon=True).start()


def _agreement_device():
    """Where the ranks' per-step flags are reduced, or None on one process."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class _Checkpointing(TrainerCallback):
    """Complete checkpoints only (ftlaunch.run.checkpoints), every save_steps and every
    --save-every, and a stop with a checkpoint at the same step on every rank.

    The last step writes no checkpoint: adapter/ is written right after it, and a
    checkpoint at max_steps would be one a resume must never train from (the Trainer
    would run a step past the end)."""

    def __init__(self, run_dir: Path, record: run_record.RunRecord, stop: _StopRequest,
                 guard: _NonFiniteGuard):
        self.root = run_dir / "checkpoints"
        self.keep = record.checkpointing.keep
        self.save_every = record.checkpointing.save_every_s
        self.record = record
        self.stop = stop
        self.guard = guard
        self.stopped_at: int | None = None
        self._reason = "steps"
        self._last_save = time.monotonic()
        self._device = None  # of the per-step agreement; None on one process
        self._agreed: tuple[int, bool] | None = None  # this step's, until its end

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_save = time.monotonic()
        self._device = _agreement_device()

    def _agree(self, save_due: bool) -> tuple[int, bool]:
        """(stop reason code, save) as every rank sees it: the ranks' stop requests (the
        highest code; the guard's finding is one), rank 0's clock. One tiny all-reduce per
        optimizer step, on every rank at the same step, so all ranks skip a bad update,
        stop and checkpoint at the same step."""
        if self._device is None:
            return self.stop.code, save_due
        import torch
        import torch.distributed as dist

        flags = torch.tensor([self.stop.code, int(save_due and dist.get_rank() == 0)],
                             device=self._device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return int(flags[0]), bool(flags[1])

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """Agree before the update: a non-finite gradient on any rank must stop it on all."""
        due = bool(self.save_every) and time.monotonic() - self._last_save >= self.save_every
        self._agreed = self._agree(due)
        if self._agreed[0] == _StopRequest.REASONS.index(NON_FINITE) and self.guard.checks_gradients:
            self.guard.skip_update(state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        stop, due = self._agreed if self._agreed is not None else self._agree(False)
        self._agreed = None
        last = state.global_step >= state.max_steps
        non_finite = stop == _StopRequest.REASONS.index(NON_FINITE)
        if last and not non_finite:
            control.should_save = False
            return
        if stop:
            self.stopped_at = state.global_step
            self.stop.code = stop  # the reason every rank agreed on
            # After a non-finite loss only weights whose bad update was skipped are saved,
            # and never at max_steps (see the class docstring).
            save = not non_finite or (self.guard.kept_good and not last)
            control.should_training_stop = True
            control.should_save = save
            self._reason = "stop requested"
            if args.should_save:
                print(f"ftlaunch: stop requested ({self.stop.reason}): "
                      + (f"saving a checkpoint at step {state.global_step}" if save else
                         "not saving the weights at this step"), flush=True)
        elif due:
            control.should_save = True
            self._reason = "time"
        else:
            self._reason = "steps"

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:  # save_strategy="epoch": same rule
            control.should_save = False

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # every rank has written its part (its RNG state, its shards)
        staging = self.root / checkpoints.INCOMING / f"checkpoint-{state.global_step}"
        if args.should_save and staging.is_dir():
            target = checkpoints.finalize(staging, self.root, self._manifest(args, state))
            checkpoints.retain(self.root, self.keep)
            print(f"ftlaunch: {target.name} complete ({self._reason})", flush=True)
        _barrier()
        self._last_save = time.monotonic()

    def _manifest(self, args, state) -> dict:
        import datetime as dt

        record = self.record
        global_batch = (args.per_device_train_batch_size * args.gradient_accumulation_steps
                        * args.world_size)
        return {
            "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "reason": self._reason,
            "world_size": args.world_size,
            "per_device_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "global_batch_size": global_batch,
            "samples_seen": state.global_step * global_batch,
            "max_steps": state.max_steps,
            "engine": record.strategy.engine,
            "format": record.strategy.checkpoint_format,
            "plan_hash": record.plan_hash,
            "data_fingerprint": record.data.fingerprint,
            "identity": record.identity,
            "versions": {k: v for k, v in record.versions.items() if k != "executable"},
        }


if __name__ == "__main__":
    exit_quickly(main())
