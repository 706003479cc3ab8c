"""Start `accelerate launch` on the shared SFT module and stay in charge of it.

A plain one-process plan starts the module itself, with the environment accelerate
launch would give it (single_process_env): the same process, one interpreter start
and torch import less.

The workers run in a session of their own: a Ctrl-C or a scheduler's signal
reaches the launcher, which decides what the workers get (see run). Their
output is streamed live and also kept in train.log.

Exit codes of `ftlaunch train` (after any in-job restarts: launch.restarts): 0 done
(adapter/ written); 1 training failed; 2 user error; STALLED_EXIT (3) no progress for
--stall-timeout, the job was killed
(re-run to resume from the last complete checkpoint); PREEMPTED_EXIT (75) stopped on a signal after a complete
checkpoint, re-run to resume; DISK_FULL_EXIT (74, ftlaunch.run.diskfull) the disk filled up
mid-run: free space there, then re-run to resume from the last complete checkpoint;
128+N stopped by signal N before a checkpoint could be completed (a re-run resumes from
the last complete one).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from ftlaunch.launch import interrupts
from ftlaunch.launch import rank_deaths
from ftlaunch.errors import UserError
from ftlaunch.run import record as run_record

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped with a complete checkpoint, try again
STALLED_EXIT = 3  # no rank made progress for --stall-timeout: killed, a re-run resumes


def command(config_path: Path, run_dir: Path, resume_from: Path | None,
            main_process_port: int | None, node=None, direct: bool = False) -> list[str]:
    """`node` (a render.Rendezvous) names this node's rank and node 0's address on the
    command line: on a shared run directory every node launches from node 0's
    accelerate.yaml, whose machine_rank is node 0's. `direct`: the worker itself, for a
    config that single_process_env can stand in for."""
    worker = ["-m", run_record.WORKER_MODULE, "--run-dir", str(run_dir)]
    if resume_from is not None:
        worker += ["--resume-from", str(resume_from)]
    if direct:
        return [sys.executable, *worker]
    # `python -m accelerate.commands.launch` is `accelerate launch` from this same interpreter,
    # so the workers always run in the environment ftlaunch was installed into.
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path)]
    if node is not None:
        argv += ["--machine_rank", str(node.machine_rank),
                 "--main_process_ip", node.main_process_ip]
    if main_process_port is not None:
        argv += ["--main_process_port", str(main_process_port)]
    return argv + worker


# The accelerate.yaml keys single_process_env reproduces; a config with any other key (or
# another value of the fixed ones) goes through accelerate launch.
_SINGLE_PROCESS_FIXED = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "NO",
                         "num_processes": 1, "num_machines": 1, "machine_rank": 0}
_SINGLE_PROCESS_FREE = {"use_cpu", "gpu_ids", "mixed_precision", "downcast_bf16",
                        "rdzv_backend", "same_network"}


def single_process_env(config_path: Path, env: dict[str, str]) -> dict[str, str] | None:
    """The environment `accelerate launch` would give the one process of a plain
    single-process config (accelerate's prepare_simple_launcher_cmd_env), or None for
    any other config. Starting the worker directly with it saves accelerate launch's own
    interpreter start and torch import (~1 s of every single-GPU run); the test compares
    it with accelerate's function for every single-process template."""
    import yaml

    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    if (set(config) - set(_SINGLE_PROCESS_FIXED) - _SINGLE_PROCESS_FREE
            or any(config.get(k) != v for k, v in _SINGLE_PROCESS_FIXED.items())):
        return None
    use_cpu = bool(config.get("use_cpu", False))
    env = {**env, "ACCELERATE_USE_CPU": str(use_cpu)}
    gpu_ids = config.get("gpu_ids")
    if gpu_ids not in (None, "all"):
        env["CUDA_VISIBLE_DEVICES"] = str(gpu_ids)
    if use_cpu:
        env["KMP_AFFINITY"] = "granularity=fine,compact,1,0"
        env["KMP_BLOCKTIME"] = "1"
    env["ACCELERATE_MIXED_PRECISION"] = str(config.get("mixed_precision", "no")).lower()
    env.update({"ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_DYNAMO_MODE": "default",
                "ACCELERATE_DYNAMO_USE_FULLGRAPH": "False", "ACCELERATE_DYNAMO_USE_DYNAMIC": "False",
                "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "False"})
    threads = int(env.get("OMP_NUM_THREADS") or 0)
    if not threads and use_cpu:  # worker_env sets it for CPU plans; accelerate's own default
        import psutil

        threads = int(psutil.cpu_count(logical=False) or 1)
    env["OMP_NUM_THREADS"] = str(threads or 1)
    return env


def printable(argv: list[str]) -> str:
    return shlex.join(argv)


# Set for the workers of GPU jobs unless the environment already says otherwise.
DISTRIBUTED_DEFAULTS = {
    # A failed or timed-out collective aborts the job instead of leaving it hanging, so
    # the launcher sees a failure (and a re-run resumes) rather than a silent stall.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    # NCCL's own reason for a failure (a bad interface, an IB error) lands in train.log.
    "NCCL_DEBUG": "WARN",
}
_DISTRIBUTED_PREFIXES = ("NCCL_", "TORCH_NCCL_", "GLOO_", "TORCH_DISTRIBUTED_")


def distributed_env(plan, environ) -> dict[str, str]:
    """The distributed settings the workers get: the defaults above for multi-GPU plans,
    then whatever NCCL/gloo variables the environment sets (they win)."""
    env = dict(DISTRIBUTED_DEFAULTS) if plan.num_processes > 1 and not plan.on_cpu else {}
    env.update({k: v for k, v in environ.items() if k.startswith(_DISTRIBUTED_PREFIXES)})
    return dict(sorted(env.items()))


def worker_env(num_processes_per_node: int, cpu_cores: int, on_cpu: bool,
               offline: bool, distributed: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(distributed or {})
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
    """Bind it for a moment where rank 0 will: a busy port fails now, not in torchrun.
    With SO_REUSEADDR, as torchrun's store binds, so the closing connections of a run
    that just ended (TIME_WAIT) do not count as busy; a listener does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise UserError(
                f"--master-port {port} is already in use on this machine, so rank 0 cannot "
                "listen on it. Pick a free port (or leave --master-port out on a single node "
                "and ftlaunch picks one)."
            ) from None


def run(argv: list[str], env: dict[str, str], log_path: Path, grace_s: float = 120.0,
        watch=None) -> tuple[int, int | None, object, list[dict]]:
    """Run the workers, stream their output; return (exit code, signal received or None,
    the heartbeat.Stall that ended the job or None, the workers that ended with a failure
    or unknown exit code on their own: rank_deaths.Watch.ended).

    The first SIGTERM/SIGINT goes to the workers themselves (not to torchrun's agent,
    which would SIGKILL them 30 s later): they finish the step, checkpoint and exit. A
    second signal, or the grace period running out, kills every process of the job.
    `watch` (a heartbeat.Watch) is asked every few seconds; when it reports a stall, the
    workers are asked for their Python stacks (SIGUSR1, into the logs) and the job is
    killed: a hung rank cannot finish a step, so there is nothing to save.
    """
    received: list[int] = []
    # The launcher's pid (workers stop when it dies) and its log (a node's first rank's
    # error record names it: ftlaunch.run.rank_logs).
    env = {**env, "FTLAUNCH_LAUNCHER_PID": str(os.getpid()), "FTLAUNCH_LOG": str(log_path)}
    # The workers write to train.log, not to a pipe of ours: if the launcher dies, their
    # output (and their stop with a checkpoint) does not die with it.
    with open(log_path, "ab") as log:
        offset = log.tell()
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    known: dict[int, object] = {}  # every process of the job seen so far (workers have
    # sessions of their own under torchrun, so the process group alone misses them)

    def kill_all() -> None:
        for proc in _job_processes(process, known):
            _kill(proc, signal.SIGKILL)
        _signal_group(process, signal.SIGKILL)

    grace = threading.Timer(grace_s, kill_all)
    grace.daemon = True

    def forward(signum, _frame):
        received.append(signum)
        if len(received) > 1:
            kill_all()
            return
        workers = [p for p in _job_processes(process, known) if _is_worker(p)]
        if workers:
            for proc in workers:
                _kill(proc, signum)
        else:  # nothing is training yet: nothing to save
            _signal_group(process, signum)
        grace.start()

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    def ask_for_stacks() -> None:
        for proc in _job_processes(process, known):
            if _is_worker(proc):
                _kill(proc, signal.SIGUSR1)  # faulthandler: every thread's stack

    watched: dict[int, object] = {}  # `known`'s twin: a signal handler may be using `known`
    ranks = rank_deaths.Watch(lambda: [p for p in _job_processes(process, watched) if _is_worker(p)])
    try:
        stall = _follow(log_path, offset, process, watch, ask_for_stacks, ranks)
        ranks.stop()
        if stall is not None:
            kill_all()
        code = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        grace.cancel()
        ranks.stop()
        # Nothing outlives the launcher: not the workers of a launcher that is itself
        # failing, not a worker left behind by its agent.
        kill_all()
        process.wait()
    ended = ranks.ended(process.pid, code)  # a direct launch's worker is our own child
    if code < 0:
        code = 128 - code
    return code, (received[0] if received else None), stall, ended


STACK_DUMP_WAIT_S = 3.0  # for the workers' stacks to reach the log before the kill
_WATCH_EVERY_S = 2.0
_LOOK_EVERY_S = 0.2  # at the workers: when a killed rank is first seen gone


def _follow(log_path: Path, offset: int, process: subprocess.Popen, watch=None,
            on_stall=None, ranks=None):
    """Stream what the workers append to train.log until the launch process exits; return
    the stall `watch` found, if any. After a stall, `on_stall()` is called and the log
    is streamed STACK_DUMP_WAIT_S longer (the stacks it asked for), then it returns.
    `ranks` (a rank_deaths.Watch) is shown the workers a few times a second, and filters
    the agent's failure report out of what is streamed."""
    import time

    next_watch = time.monotonic() + _WATCH_EVERY_S
    next_look = 0.0
    stall, until = None, None
    with open(log_path, "rb") as log:
        log.seek(offset)
        while True:
            finished = process.poll() is not None
            ending = finished or (until is not None and time.monotonic() >= until)
            if ranks is not None and time.monotonic() >= next_look:
                next_look = time.monotonic() + _LOOK_EVERY_S
                ranks.see()
            raw = log.read()
            chunk = raw if ranks is None else ranks.report.feed(raw, final=ending and not raw)
            if chunk:
                try:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                except BrokenPipeError:  # nobody reads our output any more; train.log has it
                    interrupts.discard_output()
                except ValueError:
                    pass
            elif raw:
                pass  # all of it held back or filtered: read on
            elif ending:
                return stall
            else:
                time.sleep(0.05)
            if watch is not None and stall is None and time.monotonic() >= next_watch:
                next_watch = time.monotonic() + _WATCH_EVERY_S
                stall = watch.check()
                if stall is not None:
                    on_stall()
                    until = time.monotonic() + STACK_DUMP_WAIT_S


def _job_processes(process: subprocess.Popen, known: dict) -> list:
    """The job's processes still alive: the launch process (a single process's worker
    itself) and its descendants now, plus any seen before (a worker whose agent died is
    re-parented away from our tree)."""
    import psutil

    try:
        root = psutil.Process(process.pid)
        for proc in [root, *root.children(recursive=True)]:
            known.setdefault(proc.pid, proc)
    except psutil.Error:
        pass
    alive = []
    for pid, proc in list(known.items()):
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
            else:
                known.pop(pid)
        except psutil.Error:
            known.pop(pid)
    return alive


def _is_worker(proc) -> bool:
    import psutil

    try:
        args = proc.cmdline()
    except psutil.Error:
        return False
    # torchrun's agent is the `accelerate launch` process; its arguments name the module too.
    return run_record.is_worker_command(args) and "accelerate.commands.launch" not in args


def _kill(proc, signum: int) -> None:
    import psutil

    try:
        proc.send_signal(signum)
    except psutil.Error:
        pass


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
