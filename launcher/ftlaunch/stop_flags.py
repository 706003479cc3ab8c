"""The command line's stop flags, which `train` (and `resume`, through it) takes: how the
nodes meet, how checkpoints and stops are timed, what watches the run. Declared once
here as click options (`stop_options`), read into the Options fields they set
(`stop_settings`), with the durations they take (`parse_duration`).
"""

from __future__ import annotations

import re

from ftlaunch.errors import UserError

_UNITS = {"s": 1, "m": 60, "h": 3600}

# --max-restarts' default. Three: enough for the transient failures a rented node has
# (one rank's OOM on an unlucky batch, an ECC error, a flaky NCCL link), while a failure
# that repeats at the same step is stopped after one restart anyway (launch.restarts);
# a job that fails three times in one launch more likely has a bad node, which a
# scheduler should replace (torchrun's own examples use --max-restarts=3).
DEFAULT_MAX_RESTARTS = 3


def parse_duration(text: str, flag: str) -> float:
    """'90', '90s', '30m', '1h', '1h30m' -> seconds."""
    value = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([smh])", value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise UserError(f"{flag} {text!r} is not a duration; write it like 90s, 30m or 1h30m.")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise UserError(f"{flag} {text!r} must be longer than zero.")
    return seconds


def stop_options(func):
    """The flags `train` and `resume` share: how the nodes meet, how checkpoints and
    stops are timed, what watches the run, how often a failed job restarts."""
    import click  # here: plan.job takes DEFAULT_MAX_RESTARTS without the command line

    func = click.option("--report-to", "report_to", metavar="TRACKER[,TRACKER]",
                        help="Also log to these trackers: tensorboard (into RUN_DIR/tensorboard), "
                             "wandb, mlflow, ... (their packages must be installed; credentials "
                             "come from the environment, e.g. WANDB_API_KEY).")(func)
    func = click.option("--max-restarts", type=click.IntRange(min=0),
                        default=DEFAULT_MAX_RESTARTS, show_default=True, metavar="N",
                        help="When a worker fails (a crash, a killed rank, a hung collective), "
                             "stop every worker and start them again from the newest complete "
                             "checkpoint, up to N times in this launch. Not restarted: user "
                             "errors, a NaN loss, a SIGTERM/SIGINT, a full disk, and a failure "
                             "that repeats at the same step. 0: a failure ends the job.")(func)
    func = click.option("--stall-timeout", default="30m", show_default=True, metavar="DURATION",
                        help="Stop the job when no rank has made progress (a step, an eval "
                             "batch, a save) for this long: a hung collective or a stuck GPU is "
                             "reported with each rank's last step, and a re-run resumes. 'off' "
                             "disables it.")(func)
    func = click.option("--join-timeout", default="15m", show_default=True, metavar="DURATION",
                        help="Multi-node: how long the nodes wait for each other to start "
                             "before giving up (exit 2).")(func)
    func = click.option("--save-every", metavar="DURATION",
                        help="Also write a checkpoint at least this often (30m, 1h), besides "
                             "every save_steps steps.")(func)
    func = click.option("--grace", default="120s", show_default=True, metavar="DURATION",
                        help="On SIGTERM/SIGINT: time to finish the step and write a complete "
                             "checkpoint before the job is killed (exit code 75 when it made "
                             "it). A second signal stops at once.")(func)
    return func


def stop_settings(kwargs: dict) -> None:
    """Replace the stop flags' values in a command's parameters with the Options fields
    they set: join_timeout_s, grace_s, save_every_s and stall_timeout_s in seconds (None:
    no --save-every; --stall-timeout off), report_to as a tuple of trackers (None: not
    given)."""
    kwargs["join_timeout_s"] = parse_duration(kwargs.pop("join_timeout"), "--join-timeout")
    kwargs["grace_s"] = parse_duration(kwargs.pop("grace"), "--grace")
    every = kwargs.pop("save_every")
    kwargs["save_every_s"] = parse_duration(every, "--save-every") if every else None
    stall = str(kwargs.pop("stall_timeout")).strip().lower()
    kwargs["stall_timeout_s"] = None if stall == "off" else parse_duration(stall, "--stall-timeout")
    report_to = kwargs.pop("report_to")
    kwargs["report_to"] = tuple(t.strip() for t in report_to.split(",") if t.strip()) \
        if report_to else None
