"""Shared test setup: offline, a private ftlaunch cache, and the real console script."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FTLAUNCH = str(Path(sys.executable).parent / "ftlaunch")


@pytest.fixture(scope="session", autouse=True)
def offline_cache(tmp_path_factory) -> Path:
    """Nothing is downloaded in tests, and built models go to a cache of the session's own."""
    cache = tmp_path_factory.mktemp("ftlaunch-cache")
    os.environ["FTLAUNCH_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    return cache


# The one CPU training the export and training tests share (see tiny_run).
TINY_TRAIN = ("--model", "tiny", "--gpus", "1", "--max-steps", "12", "--global-batch-size", "4",
              "--seq-len", "128", "--set", "logging_steps=2", "--set", "save_steps=6",
              "--set", "learning_rate=5e-3")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, offline_cache) -> tuple[subprocess.CompletedProcess, Path]:
    """(launcher output, run directory) of one finished tiny training on CPU (TINY_TRAIN:
    12 steps, a checkpoint at 6; the last step writes adapter/), made once per session. Shared: a test that writes
    into the run directory works on a shutil.copytree copy of it."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    proc = run_ftlaunch(*TINY_TRAIN, "--output-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, run_dir


@pytest.fixture(scope="session")
def tiny_chat_tokenizer():
    """The tiny model's tokenizer as preference data loads it: its own chat template
    (ftlaunch's fallback only without one), no assistant marks."""
    from ftlaunch.data import tokenize
    from ftlaunch.models import builtin, presets
    from ftlaunch.models.source import ModelSource

    path = builtin.materialize_builtin(presets.resolve("tiny"))
    source = ModelSource("tiny", "builtin:tiny", str(path), str(path))
    tokenizer, _ = tokenize.load_tokenizer(source, assistant_only=False, kind="chat_preference")
    return tokenizer


def run_ftlaunch(*args: str, cwd: Path | None = None, timeout: int = 600,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([FTLAUNCH, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def has_cuda() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_MOUNT = 'mount -t tmpfs -o size="$1" tmpfs "$2" || exit 97; shift 2; exec "$@"'


def in_tmpfs(mount: Path, size: str, argv: list[str]) -> list[str]:
    """The command that runs argv with a fresh tmpfs of `size` mounted at `mount`, in a
    private user + mount namespace (no privileges needed, nothing visible outside): a
    real filesystem of a known, small size."""
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", _MOUNT, "sh", size,
            str(mount), *argv]


@pytest.fixture(scope="session")
def tmpfs_allowed(tmp_path_factory):
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a private tmpfs")
    probe = subprocess.run(in_tmpfs(tmp_path_factory.mktemp("tmpfs-probe"), "64k", ["true"]),
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"this machine does not allow a tmpfs in a user namespace: "
                    f"{probe.stderr.strip()[-300:]}")


def parse_ftlaunch(args: list[str]) -> tuple[str, dict]:
    """(command name, its parameters) as ftlaunch's own click command line parses
    `args`; unknown flags and bad values raise click.UsageError."""
    import click

    from ftlaunch.cli import cli

    args = list(args)
    if not args or {"-h", "--help", "--version"} & set(args):
        return "help", {}
    if args[0] not in cli.commands:
        args = ["train", *args]  # as ftlaunch does: train is the default command
    command, name = cli, "ftlaunch"
    while isinstance(command, click.Group):
        assert args and args[0] in command.commands, f"ftlaunch has no command {args[:1]}"
        name, command, args = args[0], command.commands[args[0]], args[1:]
    with command.make_context(name, args) as ctx:
        return name, dict(ctx.params)


def train_params(args: list[str]) -> dict:
    """The parameters of `ftlaunch ARGS`, which must be a training command."""
    command, params = parse_ftlaunch(args)
    assert command == "train", f"not a training command: ftlaunch {' '.join(args)}"
    return params


def grace_s(params: dict) -> float:
    from ftlaunch.stop_flags import parse_duration

    return parse_duration(params["grace"], "--grace")



# --- user errors, as every CLI test checks them ---------------------------------------------

USER_ERROR = 2
ERROR_PREFIX = "ftlaunch: error:"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# Variables from which ftlaunch would read a multi-node context (ftlaunch.detect.cluster): a CLI
# test must not depend on the scheduler the tests happen to run under.
_CLUSTER_VARS = ("NNODES", "PET_NNODES", "NODE_RANK", "PET_NODE_RANK", "GROUP_RANK",
                 "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "CUDA_VISIBLE_DEVICES")


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory) -> dict:
    """The environment of a module's ftlaunch commands: offline, a cache of the module's
    own, no cluster variables, no warnings."""
    root = tmp_path_factory.mktemp("cli-env")
    env = {k: v for k, v in os.environ.items()
           if k not in _CLUSTER_VARS and not k.startswith("SLURM_")}
    env.update(FTLAUNCH_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_HUB_CACHE=str(root / "hf-hub"),
               PYTHONWARNINGS="ignore")
    return env


def _found(needle, message: str) -> bool:
    """A needle: a substring, a compiled regex, or a tuple of alternatives."""
    if isinstance(needle, tuple):
        return any(_found(n, message) for n in needle)
    if isinstance(needle, re.Pattern):
        return needle.search(message) is not None
    return needle in message


def user_error_problems(result: subprocess.CompletedProcess, needles=(),
                        forbidden=()) -> list[str]:
    """What is wrong with `result` as a user error (empty: nothing): exit 2, no traceback,
    exactly one one-paragraph `ftlaunch: error:` message on stderr holding every needle,
    no forbidden text on either stream."""
    problems = []
    if result.returncode != USER_ERROR:
        problems.append(f"exit code {result.returncode}, not {USER_ERROR}")
    for stream, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        if "Traceback" in text:
            problems.append(f"a traceback on {stream}")
        problems += [f"{stream} has {bad!r}, which it must not" for bad in forbidden
                     if bad in text]
    count = result.stderr.count(ERROR_PREFIX)
    if count != 1:
        problems.append(f"{count} {ERROR_PREFIX!r} lines on stderr, not exactly one")
    elif not result.stderr.startswith(ERROR_PREFIX):
        problems.append("stderr has other output before the error")
    message = result.stderr[result.stderr.find(ERROR_PREFIX):].strip() if count else result.stderr
    if re.search(r"\n[ \t]*\n", message):
        problems.append("the message is not one paragraph (it has a blank line)")
    problems += [f"the message lacks {n!r}" for n in needles if not _found(n, message)]
    return problems


def error_report(problems: list[str], result: subprocess.CompletedProcess) -> str:
    return ("\n".join(problems) + f"\n--- exit code {result.returncode}; stderr:\n"
            f"{result.stderr[-4000:]}\n--- stdout (tail):\n{result.stdout[-1500:]}")


def assert_user_error(result: subprocess.CompletedProcess, *needles, forbidden=()) -> str:
    """user_error_problems as an assertion; returns the message."""
    problems = user_error_problems(result, needles, forbidden)
    if problems:
        pytest.fail(error_report(problems, result), pytrace=False)
    return result.stderr.strip()


def tree(root: Path) -> dict[str, tuple]:
    """relative path -> (size, sha256, mtime_ns) for each file, ("dir", mtime_ns) for each
    directory (root included, as "."), ("link", target) for each symlink: enough to tell
    that nothing under `root` was touched."""
    import hashlib

    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        out[str(here.relative_to(root))] = ("dir", here.stat().st_mtime_ns)
        for name in [*filenames, *(d for d in dirnames if (here / d).is_symlink())]:
            path = here / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
                continue
            stat = path.stat()
            out[rel] = (stat.st_size, hashlib.sha256(path.read_bytes()).hexdigest(),
                        stat.st_mtime_ns)
    return out


def fill_disk_when(condition: str, poll_s: float) -> str:
    """Shell lines for a script run with in_tmpfs: wait (at most 3000 polls) while the
    job $pid runs until `condition` (a shell test) holds, then fill the filesystem at $M."""
    return (f'i=0\nwhile ! {condition} && kill -0 $pid 2>/dev/null; do\n'
            f'  i=$((i+1)); [ $i -gt 3000 ] && break\n  sleep {poll_s}\ndone\n'
            'dd if=/dev/zero of="$M/filler" bs=64k 2>/dev/null\n')


def wait_for(predicate, launcher: subprocess.Popen, timeout: float, what: str, poll: float = 0.2):
    """predicate()'s first true value, while `launcher` runs; fails when it ends first
    (with its output, if piped) or the time runs out."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if launcher.poll() is not None:
            raise AssertionError(f"ftlaunch ended (exit {launcher.returncode}) before "
                                 f"{what}:\n{launcher.communicate()[0]}")
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def write_run_record(run_dir: Path, identity: dict) -> None:
    """A run.yaml as the launcher writes it, for a run with this identity (tests of what
    reads it back; the values besides the identity are a plausible 1-process tiny run)."""
    from ftlaunch.models.source import ModelSource
    from ftlaunch.run import record

    strategy = record.Strategy(
        method="lora", engine="cpu", zero_stage=None, offload=False, precision="fp32",
        on_cpu=True, nnodes=1, processes_per_node=1, world_size=1, per_device_batch_size=4,
        gradient_accumulation_steps=1, global_batch=4, seq_len=64,
        gradient_checkpointing=False, checkpoint_format="trainer", node_local=False)
    record.write(run_dir, record.RunRecord(
        ftlaunch_version="test", written="2026-01-01T00:00:00+00:00", command=("--model", "tiny"),
        cwd=str(run_dir), identity=identity,
        model=ModelSource("tiny", "builtin:tiny", load_from="tiny", tokenizer="tiny"),
        data=record.DataSource(path="data.jsonl", format="messages", kind="conversational",
                               fingerprint="sha256:0", examples=1),
        recipe={}, plan={}, hardware={}, versions={}, plan_hash="sha256:0",
        checkpointing=record.Checkpointing(keep=2, save_every_s=None, grace_s=60),
        nodes={"nnodes": 1, "node_rank": 0, "storage": record.SHARED},
        distributed=record.Distributed(timeout_s=600, env={}), strategy=strategy, trainer={}))
