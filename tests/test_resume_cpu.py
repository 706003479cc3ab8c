"""Resume that never loses work, with real processes and real signals.

An uninterrupted tiny run is the reference; the same run stopped by SIGKILL at
random moments (one of them while a checkpoint is being written) or by SIGTERM,
and resumed until done, must end with bitwise-equal adapter weights and the same
logged loss sequence; so must a run whose rank 1 is killed mid-run and which the
launcher restarts in the job. (SIGTERM's stop checkpoint on every rank, exit 75 and its
exact resume are tests/test_strategies_cpu.py's, for every strategy.)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import run_ftlaunch
from jobs import assert_same_adapter, fault_env, losses, restart_lines
from jobs import job_processes as _job
from jobs import logged_steps as _logged_steps
from jobs import power_loss as _power_loss
from jobs import start as _start
from jobs import wait as _wait

pytestmark = pytest.mark.slow

# 12 steps of 4 examples, a checkpoint every 3 steps, a loss logged every step;
# LoRA dropout stays on (recipe default) so the RNG state must be restored too.
RUN = ("--model", "tiny", "--max-steps", "12", "--global-batch-size", "4", "--seq-len", "64",
       "--set", "logging_steps=1", "--set", "save_steps=3", "--set", "learning_rate=5e-3")
PREEMPTED_EXIT = 75


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs on 1 and 2 processes: {processes: run_dir}."""
    runs = {}
    for gpus in ("1", "2"):
        run_dir = tmp_path_factory.mktemp("reference") / f"run-{gpus}"
        proc = run_ftlaunch(*RUN, "--gpus", gpus, "--output-dir", str(run_dir))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[gpus] = run_dir
    return runs


def _incoming(run_dir: Path) -> set[tuple[str, int]]:
    """Checkpoints being written (or left half-written), by name and inode."""
    root = run_dir / "checkpoints" / ".incoming"
    try:
        return {(p.name, p.stat().st_ino) for p in root.glob("checkpoint-*")}
    except OSError:
        return set()


def _alive(procs: list[psutil.Process]) -> list[int]:
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


# Two processes only: the stricter case (every rank's RNG and data position); one
# process's resume is what the other tests here and tests/test_watchdogs.py resume.
@pytest.mark.parametrize("gpus", ["2"])
def test_sigkill_at_random_moments_then_resume_is_bitwise_the_uninterrupted_run(
        gpus, reference, tmp_path):
    seed = int(os.environ.get("FTLAUNCH_CHAOS_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    args = (*RUN, "--gpus", gpus, "--output-dir", str(run_dir))
    # Kill after a random logged step plus a random delay, and once as soon as a
    # checkpoint is being written (again at the next save if the kill came too late).
    moments = [("step", rng.randint(1, 4)), ("checkpoint write", None),
               ("step", rng.randint(8, 10))]
    torn = 0
    for kind, step in moments:
        launcher = _start(*args, log=log)
        if kind == "step":
            started = _logged_steps(run_dir)
            target = max(step, started + 1)
            hit = _wait(lambda: _logged_steps(run_dir) >= target, launcher)  # noqa: B023
            time.sleep(rng.uniform(0, 0.05))  # a step takes ~30 ms here
        else:
            hit = False
            for _ in range(3):
                old = _incoming(run_dir)  # torn by an earlier kill: set aside at start
                # Once training runs, the job's processes are known: the kill is then
                # only a few system calls after the checkpoint directory appears.
                started = _logged_steps(run_dir)
                if not _wait(lambda: _logged_steps(run_dir) > started, launcher,  # noqa: B023
                             poll=0.02):
                    break
                procs = _job(launcher)
                if not _wait(lambda: bool(_incoming(run_dir) - old), launcher,  # noqa: B023
                             poll=0.001):
                    break
                _power_loss(launcher, procs)
                if _incoming(run_dir) - old:
                    torn += 1
                    hit = True
                    break
                launcher = _start(*args, log=log)
        if launcher.poll() is None:
            _power_loss(launcher)
        assert hit or kind == "step", f"seed {seed}: never caught a checkpoint being written"
    final = run_ftlaunch(*args)
    output = log.read_text() + final.stdout
    assert final.returncode == 0, f"seed {seed}\n" + output[-3000:] + final.stderr
    assert torn >= 1
    assert "is not a complete checkpoint (it was being written when the run stopped)" in output
    assert losses(run_dir) == losses(reference[gpus]), f"seed {seed}"
    assert_same_adapter(run_dir, reference[gpus])


def test_a_rank_killed_mid_run_is_restarted_in_the_job_bitwise(reference, tmp_path):
    """`--gpus 2`: rank 1 gets a real SIGKILL (its own, at step 5, after checkpoint-3).
    Rank 0 fails in its next collective; the launcher starts both again from
    checkpoint-3, and the job ends by itself, exit 0, with the uninterrupted run's
    losses and adapter (dropout on: every rank's RNG state is restored too)."""
    run_dir = tmp_path / "run"
    proc = run_ftlaunch(*RUN, "--gpus", "2", "--output-dir", str(run_dir),
                        env=fault_env("sigkill", 5, once=tmp_path / "killed", rank=1))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    [line] = restart_lines(out)
    assert line.startswith("ftlaunch: restart 1 of 3 in 2 s: rank 1 (pid "), line
    assert "was killed by SIGKILL" in line and line.endswith("starts again from checkpoint-3."), line
    record = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert [(e["rank"], e["from"]) for e in record["restarts"]["done"]] == [(1, "checkpoint-3")]
    assert "restart 1: rank 1 (pid " in out  # in the final summary
    assert [json.loads(p.read_text())["global_step"]
            for p in sorted((run_dir / "ranks").glob("rank-*.json"))] == [12, 12]
    assert losses(run_dir) == losses(reference["2"])
    assert_same_adapter(run_dir, reference["2"])


def test_a_second_signal_stops_at_once_and_leaves_no_process(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    # Steps of several seconds, so that the second signal lands mid-step.
    launcher = _start(*RUN, "--gpus", "2", "--max-steps", "100000", "--global-batch-size", "64",
                      "--seq-len", "512", "--output-dir", str(run_dir), log=log)
    _wait(lambda: _logged_steps(run_dir) >= 1, launcher, poll=0.05)
    job = _job(launcher)
    launcher.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # two signals at once would arrive as one
    launcher.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert launcher.wait(timeout=30) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert time.monotonic() - started < 10
    assert "before a checkpoint could be completed" in log.read_text()
    time.sleep(1)
    assert not _alive(job), "processes outlived the launcher"
    assert not (run_dir / "stopped.json").exists()


def test_killing_only_the_launcher_stops_the_workers_with_a_checkpoint(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    launcher = _start(*RUN, "--gpus", "2", "--max-steps", "100000", "--set", "save_steps=100000",
                      "--output-dir", str(run_dir), log=log)
    _wait(lambda: _logged_steps(run_dir) >= 1, launcher, poll=0.05)
    job = _job(launcher)[1:]
    launcher.kill()
    launcher.wait()
    gone, alive = psutil.wait_procs(job, timeout=90)
    assert not alive, "workers outlived a SIGKILLed launcher"
    stop = json.loads((run_dir / "stopped.json").read_text())
    assert stop["why"] == "launcher exited"
    assert (Path(stop["checkpoint"]) / "ftlaunch-checkpoint.json").is_file()


def test_two_processes_resume_on_one_with_the_same_global_batch(tmp_path):
    # Without dropout the RNG plays no part, so the 1-process continuation must see the
    # very samples the 2-process run would have: its losses track that run's closely.
    args = (*RUN, "--set", "lora.lora_dropout=0", "--set", "save_steps=100")
    uninterrupted = tmp_path / "uninterrupted"
    proc = run_ftlaunch(*args, "--gpus", "2", "--output-dir", str(uninterrupted))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    launcher = _start(*args, "--gpus", "2", "--output-dir", str(run_dir), log=log)
    _wait(lambda: _logged_steps(run_dir) >= 3, launcher, poll=0.05)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=120) == PREEMPTED_EXIT, log.read_text()[-3000:]
    step = json.loads((run_dir / "stopped.json").read_text())["step"]
    manifest = json.loads((run_dir / "checkpoints" / f"checkpoint-{step}" /
                           "ftlaunch-checkpoint.json").read_text())
    assert manifest["world_size"] == 2 and manifest["global_batch_size"] == 4
    assert manifest["samples_seen"] == 4 * step

    resumed = run_ftlaunch("resume", str(run_dir), "--gpus", "1")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    note = (f"checkpoint-{step} was written by 2 processes (micro-batch 2 x accumulation 1); "
            f"resuming on 1 (micro-batch 4 x accumulation 1), global batch 4, {4 * step} samples "
            "seen so far")
    assert note in resumed.stdout
    assert note in (run_dir / "train.log").read_text()
    rank = json.loads((run_dir / "ranks" / "rank-0.json").read_text())
    assert rank["world_size"] == 1 and rank["global_step"] == 12
    resumed_losses, reference_losses = losses(run_dir), losses(uninterrupted)
    assert [s for s, _ in resumed_losses] == list(range(1, 13))
    assert resumed_losses[:step] == reference_losses[:step]
    print("loss after the resume vs uninterrupted:", resumed_losses[step:], reference_losses[step:])
    for (_, got), (_, want) in zip(resumed_losses[step:], reference_losses[step:]):
        assert abs(got - want) < 1e-4 * abs(want)


def test_a_torn_checkpoint_is_skipped_reported_and_set_aside(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference["1"], run_dir)
    shutil.rmtree(run_dir / "adapter")  # as if killed before the end
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-6",
                                                                        "checkpoint-9"]
    optimizer = checkpoints / "checkpoint-9" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])  # a file cut short
    shutil.copytree(checkpoints / "checkpoint-9", checkpoints / "checkpoint-11")
    (checkpoints / "checkpoint-11" / "ftlaunch-checkpoint.json").unlink()  # no marker

    proc = run_ftlaunch(*RUN, "--gpus", "1", "--output-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checkpoint-11 is not a complete checkpoint (it has no completion marker)" in proc.stdout
    assert "checkpoint-9 is not a complete checkpoint (optimizer.pt has 1000 bytes" in proc.stdout
    assert f"resuming {run_dir} from checkpoint-6" in proc.stdout
    # Both are kept, as they were, out of the way: their truncated optimizer.pt is still there.
    kept = list((checkpoints / "set-aside").iterdir())
    assert len(kept) == 2 and all((p / "optimizer.pt").stat().st_size == 1000 for p in kept)
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-6",
                                                                        "checkpoint-9"]
    assert losses(run_dir) == losses(reference["1"])
    assert_same_adapter(run_dir, reference["1"])


def test_an_incompatible_resume_is_refused_naming_what_differs(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference["1"], run_dir)
    shutil.rmtree(run_dir / "adapter")
    before = sorted((p.relative_to(run_dir), p.stat().st_size) for p in run_dir.rglob("*"))
    changed = [a if a != "64" else "96" for a in RUN]  # --seq-len 96
    proc = run_ftlaunch(*changed, "--gpus", "1", "--set", "lora.r=4", "--output-dir", str(run_dir))
    assert proc.returncode == 2
    assert "seq_len: was 64, now 96" in proc.stderr and "lora: was" in proc.stderr
    assert "resume.allow_changed=" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted((p.relative_to(run_dir), p.stat().st_size) for p in run_dir.rglob("*")) == before

    allowed = run_ftlaunch(*changed, "--gpus", "1", "--set", "resume.allow_changed=seq_len",
                           "--output-dir", str(run_dir))
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "changed on purpose (resume.allow_changed): seq_len: was 64, now 96" in allowed.stdout
    assert "from checkpoint-9" in allowed.stdout


def test_save_every_writes_time_based_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_ftlaunch(*RUN, "--gpus", "1", "--set", "save_steps=1000", "--save-every", "0.1s",
                        "--output-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kept = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
    assert 1 <= len(kept) <= 2  # save_total_limit 2
    assert all(json.loads((p / "ftlaunch-checkpoint.json").read_text())["reason"] == "time"
               for p in kept)
    assert "complete (time)" in proc.stdout


def test_ctrl_c_on_one_process_is_a_preemption_too(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    launcher = _start(*RUN, "--gpus", "1", "--max-steps", "100000", "--output-dir", str(run_dir),
                      log=log)
    _wait(lambda: _logged_steps(run_dir) >= 2, launcher, poll=0.05)
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(timeout=120) == PREEMPTED_EXIT, log.read_text()[-3000:]
    stop = json.loads((run_dir / "stopped.json").read_text())
    assert stop["why"] == "SIGINT"
    assert (Path(stop["checkpoint"]) / "ftlaunch-checkpoint.json").is_file()
