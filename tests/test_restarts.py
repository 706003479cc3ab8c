"""When the launcher restarts a failed job, and what it says (launch/restarts.py), on run
directories written the way workers write them: error records through run.rank_logs,
heartbeats through run.heartbeat. The restarts of real trainings are test_restarts_cpu."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import assert_user_error, run_ftlaunch
from ftlaunch.errors import UserError
from ftlaunch.launch import restarts
from ftlaunch.run import checkpoints
from ftlaunch.run import directory as rundir
from ftlaunch.run import heartbeat
from ftlaunch.run import rank_logs


def _attempt(**changes) -> restarts.Attempt:
    fields = {"code": 1, "received": None, "stall": None, "ended": (),
              "started": time.time() - 60, "resume_step": 3}
    return restarts.Attempt(**{**fields, **changes})


def _failed(run_dir: Path, monkeypatch, rank: int, exc: BaseException) -> dict:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    try:
        raise exc
    except BaseException as raised:
        return rank_logs.record_error(run_dir, raised)


def _beat(run_dir: Path, rank: int, step: int) -> None:
    heartbeat.Writer(run_dir, rank).beat(step, "training")


def test_a_rank_killed_by_a_signal_is_named_with_the_last_step_reported(tmp_path):
    _beat(tmp_path, 0, 7)
    _beat(tmp_path, 1, 6)
    killed = {"rank": 1, "pid": 4118, "time": time.time(), "exitcode": -9}
    failure = restarts.failure_of(tmp_path, _attempt(ended=(killed,)))
    assert failure.what == "rank 1 (pid 4118) was killed by SIGKILL, with no Python error"
    assert (failure.step, failure.rank, failure.never_because, failure.consequence) == (7, 1, None, False)


def test_without_a_heartbeat_of_this_attempt_the_failure_is_at_its_resume_step(tmp_path, monkeypatch):
    _beat(tmp_path, 0, 50)  # an earlier launch's
    failure = restarts.failure_of(tmp_path, _attempt(started=time.time() + 1, resume_step=3))
    assert failure.step == 3 and failure.what == "the workers exited with code 1"


def test_a_peer_s_consequence_is_told_as_one(tmp_path, monkeypatch):
    _failed(tmp_path, monkeypatch, 0, RuntimeError("Connection closed by peer [127.0.0.1]:1234"))
    failure = restarts.failure_of(tmp_path, _attempt())
    assert failure.consequence and failure.what.startswith("rank 0 failed with RuntimeError")
    # Across nodes the cause named is the first failure that is not a consequence.
    other = {"rank": 3, "what": "rank 3 (pid 9) was killed by SIGKILL", "consequence": False}
    assert restarts.first_cause([failure.cause(), other]) == other
    assert restarts.first_cause([failure.cause()]) == failure.cause()


def test_a_long_error_line_is_cut(tmp_path, monkeypatch):
    _failed(tmp_path, monkeypatch, 0, RuntimeError("x" * 400))
    what = restarts.failure_of(tmp_path, _attempt()).what
    assert what == "rank 0 failed with RuntimeError: " + "x" * 157 + "..."


@pytest.mark.parametrize("exc, never", [
    (UserError("the data changed"), "a user error fails the same way every time"),
    (OSError(28, "No space left on device"), "the disk is full; a restart would fill it again"),
])
def test_user_errors_and_a_full_disk_are_never_restarted(tmp_path, monkeypatch, exc, never):
    _failed(tmp_path, monkeypatch, 0, exc)
    failure = restarts.failure_of(tmp_path, _attempt())
    assert failure.never_because == never
    assert restarts.RestartBudget(3).refusal(failure) == never


def test_a_worker_exiting_2_is_a_user_error(tmp_path):
    failure = restarts.failure_of(tmp_path, _attempt(code=2))  # the launcher's own child
    assert failure.never_because == "a user error fails the same way every time"
    # Under accelerate launch: the agent exits 1, and reports the worker's 2.
    ended = ({"rank": 1, "pid": 9, "time": time.time(), "exitcode": 2},)
    failure = restarts.failure_of(tmp_path, _attempt(code=1, ended=ended))
    assert failure.never_because == "a user error fails the same way every time"


def test_a_full_disk_anywhere_among_the_failures_is_never_restarted(tmp_path, monkeypatch):
    _failed(tmp_path, monkeypatch, 0, RuntimeError("a CUDA error"))
    _failed(tmp_path, monkeypatch, 1, OSError(28, "No space left on device"))
    failure = restarts.failure_of(tmp_path, _attempt())
    assert failure.never_because == "the disk is full; a restart would fill it again"


def test_a_finished_run_a_stop_and_a_signal_are_not_failures(tmp_path, monkeypatch):
    _failed(tmp_path, monkeypatch, 0, RuntimeError("boom"))
    assert restarts.failure_of(tmp_path, _attempt(received=15)) is None
    rundir.write_stop_record(tmp_path, {"why": rundir.NON_FINITE_STOP, "step": 5})
    assert restarts.failure_of(tmp_path, _attempt()) is None
    rundir.clear_stop_record(tmp_path)
    assert restarts.failure_of(tmp_path, _attempt()) is not None
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert restarts.failure_of(tmp_path, _attempt()) is None


def test_a_stall_is_a_failure_that_names_the_ranks_behind(tmp_path):
    beats = ({"rank": 0, "step": 9, "phase": "training", "age_s": 30.0},
             {"rank": 1, "step": 8, "phase": "training", "age_s": 31.0})
    stall = heartbeat.Stall(31.0, 30.0, beats, ())
    failure = restarts.failure_of(tmp_path, _attempt(stall=stall))
    assert failure.what == ("no rank made progress for 31 s (a hung collective or a stuck "
                            "device; rank(s) 1 behind)")
    assert failure.rank == 1


def _failure(step: int) -> restarts.Failure:
    return restarts.Failure("rank 1 (pid 9) was killed by SIGKILL", step, 1)


def test_restarts_until_the_budget_is_spent():
    budget = restarts.RestartBudget(2)
    assert budget.refusal(_failure(5)) is None
    budget.add(_failure(5), restarts.Agreement(True, Path("/r/checkpoints/checkpoint-4")))
    assert budget.refusal(_failure(9)) is None
    budget.add(_failure(9), restarts.Agreement(True, Path("/r/checkpoints/checkpoint-8")))
    assert budget.refusal(_failure(13)) == "all 2 restart(s) of --max-restarts 2 are used"
    assert [e["from"] for e in budget.done] == ["checkpoint-4", "checkpoint-8"]


def test_a_failure_after_the_same_step_as_before_the_last_restart_is_not_restarted():
    budget = restarts.RestartBudget(3)
    budget.add(_failure(7), restarts.Agreement(True, None))
    assert budget.refusal(_failure(7)).startswith(
        "it failed again after step 7, as before restart 1: a failure that repeats")
    assert budget.refusal(_failure(8)) is None


def test_the_backoff_doubles_up_to_a_minute():
    budget = restarts.RestartBudget(10)
    waits = []
    for step in range(7):
        budget.add(_failure(step), restarts.Agreement(True, None))
        waits.append(budget.backoff_s())
    assert waits == [2, 4, 8, 16, 32, 60, 60]


def test_a_restart_is_announced_and_recorded_with_the_cause_the_nodes_agreed_on():
    budget = restarts.RestartBudget(3)
    cause = {"rank": 3, "what": "rank 3 (pid 77) was killed by SIGKILL", "consequence": False}
    peer = restarts.Failure("rank 0 failed with RuntimeError: Connection closed by peer", 5, 0,
                            consequence=True)
    event = budget.add(peer, restarts.Agreement(True, Path("/r/checkpoints/checkpoint-4"),
                                                cause=cause))
    assert (event["rank"], event["error"], event["step"], event["from"]) == (
        3, cause["what"], 5, "checkpoint-4")
    assert budget.announce(event, 2.0) == (
        "restart 1 of 3 in 2 s: rank 3 (pid 77) was killed by SIGKILL, after step 5; every "
        "worker starts again from checkpoint-4")
    assert restarts.describe([event]) == [
        "  restart 1: rank 3 (pid 77) was killed by SIGKILL, after step 5; resumed from checkpoint-4"]


def _complete(root: Path, step: int) -> Path:
    staging = root / checkpoints.INCOMING / f"checkpoint-{step}"
    staging.mkdir(parents=True)
    (staging / "adapter_model.safetensors").write_bytes(b"weights %d" % step)
    return checkpoints.finalize(staging, root, {"world_size": 1})


def test_one_node_sets_torn_checkpoints_aside_and_restarts_from_the_newest_complete(tmp_path):
    root = tmp_path / "checkpoints"
    torn = root / "checkpoint-6"
    torn.mkdir(parents=True)  # no manifest: being written when the rank died
    agreement = restarts.alone(tmp_path)(None, _failure(7))
    assert agreement.go and agreement.checkpoint is None  # nothing complete: from the start
    assert not torn.exists() and any("checkpoint-6 is not a complete checkpoint" in n
                                     for n in agreement.notes)
    for step in (2, 4):
        _complete(root, step)
    (root / "checkpoint-6").mkdir()  # torn again
    agreement = restarts.alone(tmp_path)(None, _failure(7))
    assert agreement.checkpoint == root / "checkpoint-4" and not (root / "checkpoint-6").exists()
    assert restarts.alone(tmp_path)("a refusal", _failure(7)) == restarts.Agreement(False)


def test_a_negative_max_restarts_is_a_user_error(tmp_path):
    proc = run_ftlaunch("--model", "tiny", "--max-restarts", "-1", "--dry-run",
                        "--output-dir", str(tmp_path / "run"))
    assert_user_error(proc, "--max-restarts", "-1")
    assert not (tmp_path / "run").exists()
