"""Start `accelerate launch` on the shared SFT module and stay in charge of it.

The workers run in their own process group so that a signal to the launcher
reaches every rank (and nothing is left behind if the launcher dies), their
output is streamed live and also kept in train.log, and the launcher's exit
code is the training's.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ftlaunch.errors import UserError


def command(config_path: Path, run_dir: Path, resume_from: Path | None,
            main_process_port: int | None) -> list[str]:
    # `python -m accelerate.commands.launch` is `accelerate launch` from this same interpreter,
    # so the workers always run in the environment ftlaunch was installed into.
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path)]
    if main_process_port is not None:
        argv += ["--main_process_port", str(main_process_port)]
    argv += ["-m", "ftlaunch.train", "--run-dir", str(run_dir)]
    if resume_from is not None:
        argv += ["--resume-from", str(resume_from)]
    return argv


def printable(argv: list[str]) -> str:
    return shlex.join(argv)


def worker_env(num_processes_per_node: int, cpu_cores: int, on_cpu: bool,
               offline: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # one bar per rank is noise
    if on_cpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
        # Without this every rank starts one thread per core and they fight over them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_cores // max(num_processes_per_node, 1))))
    if offline:
        # The model is local: never let a library reach for the hub.
        env["HF_HUB_OFFLINE"] = "1"
        env["HF_DATASETS_OFFLINE"] = "1"
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            raise UserError(
                f"--master-port {port} is already in use on this machine, so rank 0 cannot "
                "listen on it. Pick a free port (or leave --master-port out on a single node "
                "and ftlaunch picks one)."
            ) from None


def run(argv: list[str], env: dict[str, str], log_path: Path) -> tuple[int, int | None]:
    """Run the workers, stream their output; return (exit code, signal received or None)."""
    received: list[int] = []
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)

    def forward(signum, _frame):
        received.append(signum)
        _signal_group(process, signum if len(received) == 1 else signal.SIGKILL)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with open(log_path, "ab") as log:
            assert process.stdout is not None
            for line in iter(process.stdout.readline, b""):
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
                log.write(line)
                log.flush()
        code = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if process.poll() is None:  # the launcher itself is failing: take the workers with it
            _signal_group(process, signal.SIGKILL)
            process.wait()
    if code < 0:
        code = 128 - code
    return code, (received[0] if received else None)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
