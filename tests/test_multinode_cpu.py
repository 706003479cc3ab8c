"""Two "nodes" on this machine: two `ftlaunch` processes, 2 gloo workers each, over 127.0.0.1.

Each node is started as its own launcher with the same command but its own
--node-rank, as a scheduler starts them. They meet before any worker starts,
train the tiny model as one 4-process job, stop together on SIGTERM with a
checkpoint, and resume; with a run directory per node, each node keeps a full
copy and the nodes resume from the checkpoint both hold. When a rank of node 1 dies,
both nodes meet again and restart together; when node 1 is gone for good, node 0 stops
waiting for it at --join-timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import FTLAUNCH
from jobs import fault_env, restart_lines
from ftlaunch.run import checkpoints
from ftlaunch.launch.process import free_port

pytestmark = pytest.mark.slow

PREEMPTED_EXIT = 75
RUN = ("--model", "tiny", "--gpus", "2", "--global-batch-size", "8", "--seq-len", "64",
       "--set", "logging_steps=1", "--set", "save_steps=2", "--set", "learning_rate=5e-3",
       "--nnodes", "2", "--master-addr", "127.0.0.1", "--join-timeout", "120s")


def _node(rank: int, port: int, run_dir: Path, log: Path, *extra: str,
          env: dict | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([FTLAUNCH, *RUN, "--node-rank", str(rank), "--master-port",
                                 str(port), "--output-dir", str(run_dir), *extra],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})


def _both(port: int, dirs: tuple[Path, Path], logs: tuple[Path, Path], *extra: str,
          node1_first: bool = False, env: dict | None = None
          ) -> tuple[subprocess.Popen, subprocess.Popen]:
    order = (1, 0) if node1_first else (0, 1)
    procs = {}
    for rank in order:
        procs[rank] = _node(rank, port, dirs[rank], logs[rank], *extra, env=env)
        if node1_first and rank == 1:
            _wait_for_text(logs[1], "joining node 0", procs[1])
            # Node 1 is waiting for node 0 and has written nothing into the run directory.
            assert not dirs[1].exists() or not any(dirs[1].iterdir())
    return procs[0], procs[1]


def _wait_for_text(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        assert proc.poll() is None, log.read_text(errors="replace")
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {log} after {timeout} s")


def _finish(procs, logs, timeout: float = 600) -> tuple[int, int]:
    codes = []
    for proc, log in zip(procs, logs):
        try:
            codes.append(proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError(log.read_text(errors="replace")) from None
    return tuple(codes)


def _workers_of(procs) -> list[psutil.Process]:
    found = []
    for proc in procs:
        try:
            found += psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    return found


def _ranks(run_dirs) -> dict[int, dict]:
    reports = {}
    for run_dir in run_dirs:
        for path in (run_dir / "ranks").glob("rank-*.json"):
            report = json.loads(path.read_text())
            reports[report["rank"]] = report
    return reports


def _logged_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def test_two_nodes_on_a_shared_run_dir_stop_together_and_resume(tmp_path):
    run_dir = tmp_path / "shared-run"
    logs = (tmp_path / "node0.log", tmp_path / "node1.log")
    port = free_port()
    procs = _both(port, (run_dir, run_dir), logs, "--max-steps", "8", node1_first=True)
    # Preempt both nodes once a checkpoint is complete, the way a scheduler signals each
    # node's job step: SIGTERM to each launcher.
    _wait_for_text(logs[0], "checkpoint-2 complete", procs[0])
    workers = _workers_of(procs)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    assert _finish(procs, logs) == (PREEMPTED_EXIT, PREEMPTED_EXIT), logs[1].read_text()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"workers left running: {alive}"
    stop = json.loads((run_dir / "stopped.json").read_text())
    checkpoint = Path(stop["checkpoint"])
    assert (checkpoint / "ftlaunch-checkpoint.json").is_file()
    manifest = json.loads((checkpoint / "ftlaunch-checkpoint.json").read_text())
    assert manifest["world_size"] == 4
    # One copy of everything: node 1 wrote only its own log into the shared directory.
    assert sorted(p.name for p in checkpoint.glob("rng_state_*.pth")) == [
        f"rng_state_{r}.pth" for r in range(4)]
    assert (run_dir / "train.node-1.log").is_file()
    assert not list(run_dir.glob(".ftlaunch-launch-*"))
    record = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert record["nodes"]["storage"] == "shared" and record["nodes"]["nnodes"] == 2
    assert record["plan"]["num_processes"] == 4 and record["plan"]["num_machines"] == 2

    # The same command again on both nodes resumes from that checkpoint and finishes.
    logs2 = (tmp_path / "node0-again.log", tmp_path / "node1-again.log")
    procs = _both(port, (run_dir, run_dir), logs2, "--max-steps", "8")
    assert _finish(procs, logs2) == (0, 0), logs2[0].read_text() + logs2[1].read_text()
    assert f"resuming {run_dir} from {checkpoint.name}" in logs2[0].read_text()
    assert _logged_steps(run_dir) == list(range(1, 9))
    reports = _ranks([run_dir])
    assert sorted(reports) == [0, 1, 2, 3]
    assert {r["world_size"] for r in reports.values()} == {4}
    assert len({r["adapter_checksum"] for r in reports.values()}) == 1  # one model, four ranks
    assert len({r["data_digest"] for r in reports.values()}) == 4  # each rank its own batches
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_node_local_run_dirs_resume_from_the_checkpoint_every_node_holds(tmp_path):
    dirs = (tmp_path / "node0-disk" / "run", tmp_path / "node1-disk" / "run")
    logs = (tmp_path / "node0.log", tmp_path / "node1.log")
    port = free_port()
    procs = _both(port, dirs, logs, "--max-steps", "6")
    assert _finish(procs, logs) == (0, 0), logs[0].read_text() + logs[1].read_text()
    for rank, run_dir in enumerate(dirs):
        record = yaml.safe_load((run_dir / "run.yaml").read_text())
        assert record["nodes"]["storage"] == "node-local"
        assert record["nodes"]["node_rank"] == rank
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
        # Each node keeps whole checkpoints: the model and optimizer, and its ranks' RNG.
        for step in (2, 4):
            checkpoint = run_dir / "checkpoints" / f"checkpoint-{step}"
            assert (checkpoint / "ftlaunch-checkpoint.json").is_file()
            assert (checkpoint / "optimizer.pt").is_file()
            assert sorted(p.name for p in checkpoint.glob("rng_state_*.pth")) == [
                f"rng_state_{r}.pth" for r in (2 * rank, 2 * rank + 1)]
    first = _ranks(dirs)
    assert sorted(first) == [0, 1, 2, 3] and len({r["adapter_checksum"] for r in first.values()}) == 1

    # Node 1 lost its newest checkpoint (and both lost the final adapter, as if killed at
    # the end): the nodes must agree on checkpoint-2, the newest that both hold.
    shutil.rmtree(dirs[1] / "checkpoints" / "checkpoint-4")
    for run_dir in dirs:
        shutil.rmtree(run_dir / "adapter")
        shutil.rmtree(run_dir / "ranks")
    logs2 = (tmp_path / "node0-again.log", tmp_path / "node1-again.log")
    procs = _both(port, dirs, logs2, "--max-steps", "6")
    assert _finish(procs, logs2) == (0, 0), logs2[0].read_text() + logs2[1].read_text()
    out0, out1 = (log.read_text() for log in logs2)
    assert "resuming from step 2" in out0
    assert "resuming" in out1 and "checkpoint-2" in out1
    assert "checkpoint-4 is not complete on every node" in out0
    assert (dirs[0] / "checkpoints" / "set-aside").is_dir()
    again = _ranks(dirs)
    assert len({r["adapter_checksum"] for r in again.values()}) == 1
    assert _logged_steps(dirs[0])[-1] == 6


def test_nodes_that_plan_differently_are_refused_before_any_worker(tmp_path):
    run_dir = tmp_path / "run"
    logs = (tmp_path / "node0.log", tmp_path / "node1.log")
    port = free_port()
    node0 = _node(0, port, run_dir, logs[0], "--max-steps", "4")
    node1 = _node(1, port, run_dir, logs[1], "--max-steps", "4", "--gpus", "1")
    assert _finish((node0, node1), logs, timeout=120) == (2, 2)
    for log in logs:
        out = log.read_text()
        assert "node 1" in out and "made a different plan" in out, out
        assert "Launching" not in out and "Traceback" not in out
    assert not (run_dir / "ranks").exists() and not (run_dir / "train.log").exists()
    assert not list(run_dir.glob(".ftlaunch-launch-*"))


def test_a_node_whose_own_preflight_fails_stops_every_node(tmp_path):
    """Node 1 keeps its own run directory and its own copy of the data, which is broken:
    it tells node 0, and both exit 2 naming node 1 and the bad line."""
    good = tmp_path / "node0-disk" / "train.jsonl"
    bad = tmp_path / "node1-disk" / "train.jsonl"
    for path in (good, bad):
        path.parent.mkdir(parents=True)
    row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    good.write_text(json.dumps(row) + "\n")
    bad.write_text(json.dumps(row) + "\n{not json\n")
    dirs = (good.parent / "run", bad.parent / "run")
    logs = (tmp_path / "node0.log", tmp_path / "node1.log")
    port = free_port()
    node0 = _node(0, port, dirs[0], logs[0], "--max-steps", "4", "--data", str(good))
    node1 = _node(1, port, dirs[1], logs[1], "--max-steps", "4", "--data", str(bad))
    assert _finish((node0, node1), logs, timeout=120) == (2, 2)
    for log in logs:
        out = log.read_text()
        assert "node 1" in out and "failed its own preflight" in out and "line 2" in out, out
        assert "Launching" not in out
    for run_dir in dirs:
        assert not (run_dir / "run.yaml").exists()


def test_a_rank_that_dies_on_node_1_restarts_both_nodes_together(tmp_path):
    """Rank 3 (node 1's second worker) SIGKILLs itself once, at step 5. Every rank of both
    nodes fails or is stopped; the nodes meet again on --master-port, agree on the newest
    checkpoint both hold (node-local run directories: each node its own copy), and train
    on to the end: exit 0 on both, one restart each. (A shared run directory's restart
    meeting: test_when_node_1_is_gone_node_0_stops_at_the_join_timeout.)"""
    storage = "node-local"
    dirs = (tmp_path / "node0-disk" / "run", tmp_path / "node1-disk" / "run")
    logs = (tmp_path / "node0.log", tmp_path / "node1.log")
    procs = _both(free_port(), dirs, logs, "--max-steps", "8",
                  env=fault_env("sigkill", 5, once=tmp_path / "killed", rank=3))
    assert _finish(procs, logs) == (0, 0), logs[0].read_text() + logs[1].read_text()
    for run_dir, log in zip(dirs, logs):
        out = log.read_text()
        [line] = restart_lines(out)
        # Only node 1 saw rank 3 die; both nodes name it (node 0's ranks only lost a peer).
        assert "rank 3 (pid " in line and "was killed by SIGKILL" in line, line
        assert line.endswith("starts again from checkpoint-4."), line
        record = yaml.safe_load((run_dir / "run.yaml").read_text())
        assert record["nodes"]["storage"] == storage
        assert [e["from"] for e in record["restarts"]["done"]] == ["checkpoint-4"]
    reports = _ranks(set(dirs))
    assert sorted(reports) == [0, 1, 2, 3]
    assert {r["global_step"] for r in reports.values()} == {8}
    assert len({r["adapter_checksum"] for r in reports.values()}) == 1
    assert _logged_steps(dirs[0]) == list(range(1, 9))


def test_when_node_1_is_gone_node_0_stops_at_the_join_timeout(tmp_path):
    """Node 1 loses power (its launcher and workers SIGKILLed) after a checkpoint: node 0's
    workers fail, node 0 waits for node 1 to restart with it (--join-timeout plus the
    stall timeout), then stops with the failure's exit code and how to resume, instead
    of hanging."""
    run_dir = tmp_path / "run"
    logs = (tmp_path / "node0.log", tmp_path / "node1.log")
    procs = _both(free_port(), (run_dir, run_dir), logs, "--max-steps", "100000",
                  "--join-timeout", "6s", "--stall-timeout", "5s")
    _wait_for_text(logs[0], "checkpoint-2 complete", procs[0])
    node1 = [psutil.Process(procs[1].pid), *psutil.Process(procs[1].pid).children(recursive=True)]
    for proc in node1:
        proc.kill()
    procs[1].wait(timeout=30)
    try:
        code = procs[0].wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(procs[0].pid, signal.SIGKILL)
        raise AssertionError(logs[0].read_text()) from None
    out = logs[0].read_text()
    assert code == 1, out
    # --join-timeout plus the stall timeout (shorter than the collective timeout here):
    # the time node 1's ranks could have needed to notice the failure.
    assert ("ftlaunch: not restarted: the nodes did not meet to restart (node(s) 1 did not "
            "join within 11 s (--join-timeout, plus the time a node's ranks may need to "
            "notice the failure: the stall or collective timeout)); that node's machine or "
            "launcher is likely gone.") in out, out
    assert not restart_lines(out)
    newest = checkpoints.scan(run_dir / "checkpoints").newest.path.name
    assert out.strip().splitlines()[-1].endswith(f"re-run the same command to resume from "
                                                 f"{newest}."), out
