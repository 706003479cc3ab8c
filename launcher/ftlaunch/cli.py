"""The `ftlaunch` command line. The bare form trains:

    ftlaunch --model llama-8b --gpus auto --data train.jsonl

User errors end with one paragraph on stderr and exit code 2; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import json
from dataclasses import asdict
import sys
from pathlib import Path

import click

from ftlaunch import __version__
from ftlaunch.launch import interrupts
from ftlaunch.errors import USER_ERROR_EXIT, UserError, exit_quickly
from ftlaunch.plan.planner import ENGINES
from ftlaunch.plan.recipe import METHODS
from ftlaunch.plan.objectives import CHOICES as OBJECTIVE_CHOICES
from ftlaunch.show import summaries
from ftlaunch.stop_flags import stop_options, stop_settings


class _TrainByDefault(click.Group):
    """`ftlaunch --model M ...` means `ftlaunch train --model M ...`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["train", *args]
        return super().parse_args(ctx, args)


def _job_options(func):
    """The flags `train` and `plan` share: both resolve the same job."""
    options = [
        click.option("--model", required=True, metavar="NAME|HF_ID|PATH",
                     help="A preset (see `ftlaunch recipes`), a hub id whose config is cached "
                          "locally, or a local model folder."),
        click.option("--gpus", default="auto", show_default=True, metavar="auto|N",
                     help="GPUs per node. Without GPUs, N CPU worker processes (gloo)."),
        click.option("--data", metavar="PATH|DIR|HUB_ID",
                     help="Training data: .jsonl/.json/.csv/.parquet, a folder of them, a "
                          "datasets.save_to_disk folder or a hub dataset id. Formats: messages, "
                          "ShareGPT, Alpaca, prompt/completion, '### Human/### Assistant' "
                          "text, plain text, preference pairs, labelled completions "
                          "(auto-detected; data.format=... "
                          "overrides). "
                          "Default: the bundled demo dataset."),
        click.option("--eval-split", type=float, metavar="FRACTION",
                     help="Hold out this fraction of --data for eval loss and perplexity."),
        click.option("--eval-data", metavar="PATH", help="A separate evaluation file."),
        click.option("--packing/--no-packing", default=None,
                     help="Pack examples into full rows, padding-free (default: on)."),
        click.option("--system-prompt", metavar="TEXT",
                     help="Prepended as the system turn of chat examples that have none."),
        click.option("--trust-remote-code", is_flag=True,
                     help="Allow the model's own Python code from the hub (off unless asked)."),
        click.option("--recipe", metavar="NAME|PATH",
                     help="Training recipe: a bundled name or a YAML file. Default: the "
                          "objective's (default for SFT, dpo for DPO, kto for KTO)."),
        click.option("--objective", type=click.Choice(OBJECTIVE_CHOICES), default="auto",
                     show_default=True,
                     help="sft; dpo on preference pairs (prompt/chosen/rejected); kto on "
                          "completions labelled desirable or not (prompt/completion/label) "
                          "or on pairs; auto: dpo for pairs, kto for labelled completions."),
        click.option("--adapter", metavar="RUN_DIR|PATH",
                     help="Start from this LoRA adapter: a finished run's (e.g. SFT before "
                          "DPO or KTO, whose reference is then that adapter, frozen) or a folder."),
        click.option("--output-dir", metavar="DIR",
                     help="Run directory. Default: runs/<model>. Re-running resumes it."),
        click.option("--method", type=click.Choice(METHODS), default="auto", show_default=True,
                     help="lora (16-bit base) or qlora (4-bit NF4 base); auto lets the plan choose."),
        click.option("--engine", type=click.Choice([e for e in ENGINES if e not in ("single", "cpu")]),
                     default="auto", show_default=True,
                     help="Multi-GPU engine; auto prefers DDP, then FSDP."),
        click.option("--max-steps", type=int, help="Stop after this many optimizer steps."),
        click.option("--epochs", type=float, help="Passes over the data (when --max-steps is not set)."),
        click.option("--seq-len", type=int, help="Maximum tokens per example."),
        click.option("--global-batch-size", type=int,
                     help="Examples per optimizer step over all processes; the plan splits it into "
                          "micro-batch x accumulation x processes."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override one recipe key: an SFTConfig field (learning_rate=1e-4), "
                          "lora.r=32, data.system_prompt=... Repeatable."),
        click.option("--nnodes", type=int,
                     help="Machines in the job. Default: from SLURM or NNODES/WORLD_SIZE "
                          "variables, else 1."),
        click.option("--node-rank", type=int,
                     help="This machine's rank (0 is where rank 0 listens). Default: from "
                          "SLURM_NODEID / NODE_RANK, else 0."),
        click.option("--master-addr", metavar="HOST", help="Address of node rank 0."),
        click.option("--master-port", type=int, metavar="PORT", help="Port rank 0 listens on."),
        click.option("--hardware", "hardware", metavar="SPEC",
                     help="Plan for described hardware instead of this machine: 1xRTX4090-24GB, "
                          "8xH100-80GB (one node; --nnodes or SLURM multiplies it), "
                          "2x8xA100-80GB (nodes x GPUs), cpu. Training runs on what it finds: "
                          "with `train` only together with --dry-run."),
        click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
                     help="Recompute activations in the backward pass (less memory, about a "
                          "third more compute), or never. Default: the plan turns it on only "
                          "when the batch does not fit without it."),
        click.option("--random-init", is_flag=True,
                     help="Build the architecture from its config with random weights (benchmarks, "
                          "hardware checks; nothing downloaded)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _to_options(kwargs, **extra):
    from ftlaunch.plan.job import Options

    return Options(**{**kwargs, **extra, "sets": tuple(kwargs.get("sets", ()))})


@click.group(cls=_TrainByDefault, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ftlaunch")
def cli():
    """Fine-tune a causal LM with LoRA/QLoRA on whatever hardware this is.

    ftlaunch detects the GPUs, plans memory and strategy (single-GPU LoRA or QLoRA,
    DDP, FSDP, DeepSpeed), writes the accelerate config, launches the training
    through `accelerate launch`, and resumes when re-run with the same command.

    \b
      ftlaunch --model llama-8b --gpus auto --data train.jsonl
      ftlaunch plan --model llama-70b --hardware 8xH100-80GB
    """


@cli.command()
@_job_options
@stop_options
@click.option("--dry-run", is_flag=True,
              help="Plan, write the configs and print the launch command; train nothing.")
@click.option("--fresh", is_flag=True,
              help="Start over: move an existing run in --output-dir aside first.")
def train(**kwargs):
    """Plan and run a LoRA/QLoRA fine-tune (the default command).

    Writes run.yaml, accelerate.yaml, checkpoints/, metrics.jsonl and adapter/
    into the output directory. Running the same command again resumes from the
    last complete checkpoint; a finished run is left alone.

    \b
    A failed worker (a crash, a killed rank, a hung collective) restarts every worker
    from the newest complete checkpoint, up to --max-restarts times.

    \b
    Exit codes: 0 done; 1 training failed (no restart left, or it failed again after
    the same step); 2 user error (a NaN/inf loss too: it stops with the last good
    weights checkpointed); 3 stalled (no progress for --stall-timeout, no restart left;
    re-run to resume); 74 the disk filled up (free space, then re-run to resume); 75
    stopped by a signal after writing a complete checkpoint (re-run to resume); 128+N stopped by
    signal N before a checkpoint was completed (a re-run resumes from the last one).
    """
    return _train(kwargs, sys.argv[1:])


def _train(kwargs: dict, argv: list[str]) -> int:
    from ftlaunch.plan import job as job_mod
    from ftlaunch.launch import start

    if kwargs.get("hardware") and not kwargs.get("dry_run"):
        raise UserError(f"--hardware {kwargs['hardware']} describes a machine to plan for; "
                        "training runs on the hardware it finds. Use it with --dry-run (to "
                        "write the configs for that machine) or with `ftlaunch plan`.")
    stop_settings(kwargs)
    job = job_mod.resolve(_to_options(kwargs))
    interrupts.echo(summaries.plan_summary(job.plan))
    return start.start_run(job, argv, interrupts.echo)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("changes", nargs=-1, type=click.UNPROCESSED)
def resume(run_dir, changes):
    """Resume RUN_DIR with the command its run.yaml recorded (run from the directory it
    was started in). Flags after RUN_DIR change that command, e.g. `--gpus 4` after a
    move to a smaller node, or `--grace 300s`."""
    import os

    from ftlaunch.run.resume_command import resume_argv

    argv, recorded_cwd = resume_argv(run_dir, changes)
    if recorded_cwd:
        os.chdir(recorded_cwd)  # relative --data paths mean what they meant then
    interrupts.echo(f"ftlaunch resume: ftlaunch {' '.join(argv)}")
    with train.make_context("ftlaunch train", list(argv)) as ctx:
        return _train(dict(ctx.params), argv)


@cli.command()
@_job_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(as_json, **kwargs):
    """Show how a job would train here (or on --hardware), and whether it fits.

    Prints each memory term per device, the budget, and why this strategy was
    chosen. A plan that does not fit exits 2 and says what would.
    """
    from ftlaunch.plan import job as job_mod
    from ftlaunch.show import report

    job = job_mod.resolve(_to_options(kwargs), detect_output_dir=False, validate=False)
    if as_json:
        click.echo(json.dumps({**job.plan.to_json(), "cluster": asdict(job.cluster)}, indent=2))
    else:
        click.echo(report.plan_text(job.plan))
        if job.cluster.nnodes > 1:
            click.echo(summaries.cluster_line(job.cluster))
    if not job.plan.fits:
        click.echo("ftlaunch: the plan does not fit: " + "; ".join(job.plan.reasons) + ".",
                   err=True)
        return USER_ERROR_EXIT
    return 0


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def hardware(as_json):
    """Show the GPUs, CPU cores, RAM and disk ftlaunch sees on this machine."""
    import os

    from ftlaunch.detect import cluster
    from ftlaunch.detect import hardware as hw
    from ftlaunch.show import report

    found = hw.detect(Path.cwd())
    context = cluster.from_env(os.environ)
    if as_json:
        data = {**found.to_json(), "cluster": asdict(context) if context else None}
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(report.hardware_text(found))
        if context:
            click.echo("  " + summaries.cluster_line(context))
    return 0


@cli.command()
def recipes():
    """List the bundled training recipes and model presets."""
    from ftlaunch.show.catalog import catalog_lines

    for line in catalog_lines():
        click.echo(line)
    return 0


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="User message; the chat template is applied.")
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--base", "base_only", is_flag=True, help="Use the base model without the adapter.")
def generate(run_dir, prompt, max_new_tokens, base_only):
    """Generate a reply with a finished run's adapter on its base model (greedy)."""
    from ftlaunch.export import generate as export

    click.echo(export.generate(run_dir, prompt, max_new_tokens, with_adapter=not base_only))
    return 0


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), metavar="DIR",
              help="Where to write the merged model. Default: RUN_DIR/merged. An existing "
                   "folder is replaced only if it is an earlier merge of this run.")
def merge(run_dir, out):
    """Merge a finished run's adapter into its base model: one standalone model folder.

    The base is reloaded unquantised (bf16 on a GPU, fp32 on CPU; also for QLoRA runs),
    and the merged model must give the same logits as base + adapter on a probe before
    anything is written. Loads with plain AutoModelForCausalLM.from_pretrained.
    """
    from ftlaunch.export import merge as export

    path = export.merge(run_dir, out)
    info = export.read_merge_record(path)
    click.echo(f"Merged model: {path}")
    click.echo(f"Checked on {info['probe_tokens']} probe tokens ({info['dtype']} on "
               f"{info['device']}): max |logit difference| vs base + adapter "
               f"{info['max_abs_logit_diff']:.3g}, tolerance {info['tolerance']:.3g} (the adapter "
               f"itself moves the logits by up to {info['adapter_effect']:.3g}).")
    if info.get("trained_method") == "qlora":
        click.echo("Note: the adapter was trained against the 4-bit base; it is merged into the "
                   "unquantised base weights.")
    return 0


@cli.command()
@click.option("--output-dir", default=".", show_default=True, metavar="DIR",
              help="Where runs will be written (its free disk is checked).")
def doctor(output_dir):
    """Check this environment for fine-tuning: packages and their versions, CUDA, bf16,
    bitsandbytes, DeepSpeed, NCCL, disk, RAM, hub access; say what is missing and how
    to fix it. Exit code 1 when something essential is missing."""
    from ftlaunch.show import doctor as doctor_mod

    checks = doctor_mod.run_checks(Path(output_dir))
    click.echo(doctor_mod.render(checks))
    return doctor_mod.exit_code(checks)


@cli.group()
def data():
    """Inspect training data as the model will see it."""


@data.command()
@_job_options
@click.option("--index", type=int, default=0, show_default=True,
              help="Which example to show (0-based).")
@click.option("--tokens", "show_tokens", is_flag=True,
              help="Also list the first tokens with their ids and train/mask.")
def preview(index, show_tokens, **kwargs):
    """Show one example rendered as training sees it, with the trained tokens marked
    [+like this+], and token-length statistics of the whole set against --seq-len."""
    from ftlaunch.plan import job as job_mod
    from ftlaunch.data import tokenize
    from ftlaunch.launch import checks, run_files
    from ftlaunch.show.data_preview import preview_lines

    job = job_mod.resolve(_to_options(kwargs), detect_output_dir=False, validate=False)
    dataset, _ = checks.load_data(job)
    if not 0 <= index < len(dataset):
        raise UserError(f"--index {index}: the data has {len(dataset)} examples (0-"
                        f"{len(dataset) - 1}).")
    tokenizer, tokenized, assistant_only = tokenize.tokenize_dataset(
        run_files.model_record(job, materialize=True), dataset, job.recipe.data)
    for line in preview_lines(dataset, tokenizer, tokenized, assistant_only, index,
                              job.plan.seq_len, show_tokens, color=sys.stdout.isatty()):
        click.echo(line)
    return 0


def main(argv: list[str] | None = None) -> None:
    import os

    from ftlaunch.quiet import silence_library_noise

    # The launcher's own lines and the progress line are the output; per-file progress
    # bars of model saving, tokenizing and loading (here and in the workers) are not.
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(name, "1")

    silence_library_noise()
    interrupts.install()
    try:
        code = cli.main(args=argv, prog_name="ftlaunch", standalone_mode=False)
    except UserError as exc:
        interrupts.echo(f"ftlaunch: error: {exc}", err=True)
        code = USER_ERROR_EXIT
    except interrupts.Interrupted as exc:
        interrupts.stop_children()
        interrupts.echo(f"ftlaunch: {exc.describe()}", err=True)
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo("ftlaunch: aborted", err=True)
        code = 130
    except click.exceptions.NoArgsIsHelpError as exc:  # `ftlaunch` alone: the help
        exc.show()
        code = USER_ERROR_EXIT
    except click.UsageError as exc:
        # One paragraph like every other user error, and where the usage is.
        command = exc.ctx.command_path if exc.ctx else "ftlaunch"
        click.echo(f"ftlaunch: error: {exc.format_message()} See `{command} --help`.", err=True)
        code = USER_ERROR_EXIT
    except click.ClickException as exc:
        exc.show()
        code = USER_ERROR_EXIT
    except Exception as exc:
        code = _known_failure(exc)
    exit_quickly(code if isinstance(code, int) else 0)


def _known_failure(exc: Exception) -> int:
    """A stop on a signal that a library's clean-up re-raised as its own error, or a full
    disk met by the launcher itself: one paragraph each. Anything else is a bug, and
    keeps its traceback."""
    from ftlaunch.launch import diskfull

    stop = interrupts.cause(exc)
    if stop is not None:
        interrupts.stop_children()
        interrupts.echo(f"ftlaunch: {stop.describe()}", err=True)
        return stop.exit_code
    if not isinstance(exc, diskfull.LauncherDiskFull):
        raise exc
    interrupts.echo(f"ftlaunch: error: {exc}", err=True)
    return diskfull.DISK_FULL_EXIT

