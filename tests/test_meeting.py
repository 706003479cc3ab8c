"""The nodes' meeting before the workers start: the decision (pure) and the exchange
itself over real loopback sockets."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ftlaunch.detect import hardware as hw
from ftlaunch.launch import meeting
from ftlaunch.errors import UserError
from ftlaunch.launch.process import free_port

H100 = hw.parse_spec("8xH100-80GB")
A100 = hw.parse_spec("8xA100-80GB")


def _hello(rank: int, hardware=H100, plan="sha256:aaa", version="0.1", shared=True,
           steps=None, data="sha256:data", run_dir="/shared/run", error=None,
           max_restarts=3) -> dict:
    return meeting.hello(rank, hardware, plan, version, Path(run_dir), data, shared,
                       [] if steps is None and rank == 0 else steps, error, max_restarts)


def test_matching_nodes_on_a_shared_directory_resume_from_node_0s_newest():
    verdict = meeting.decide([_hello(0, steps=[100, 200]), _hello(1), _hello(2)])
    assert verdict.ok and verdict.storage == meeting.SHARED and verdict.resume_step == 200


def test_node_local_directories_resume_from_the_newest_step_every_node_holds():
    verdict = meeting.decide([_hello(0, steps=[100, 200, 300]),
                            _hello(1, shared=False, steps=[100, 200]),
                            _hello(2, shared=False, steps=[200, 300])])
    assert verdict.ok and verdict.storage == meeting.NODE_LOCAL and verdict.resume_step == 200
    none_common = meeting.decide([_hello(0, steps=[300]), _hello(1, shared=False, steps=[200])])
    assert none_common.ok and none_common.resume_step is None


@pytest.mark.parametrize("other, needle", [
    (_hello(1, hardware=A100), "node 1 (" ),
    (_hello(1, hardware=A100), "has 8x A100"),
    (_hello(1, hardware=hw.parse_spec("4xH100-80GB")), "same GPUs"),
    (_hello(1, plan="sha256:bbb"), "different plan"),
    (_hello(1, version="0.2"), "runs ftlaunch 0.2"),
    (_hello(1, data="sha256:other"), "different training data"),
    (_hello(1, error="data.jsonl line 3: not JSON"), "failed its own preflight: data.jsonl line 3"),
    (_hello(1, run_dir="/mnt/elsewhere/run"), "same path on every node"),
    (_hello(1, max_restarts=0), "has --max-restarts 0, node 0 3: the nodes restart together"),
])
def test_a_node_that_differs_is_refused_naming_it(other, needle):
    verdict = meeting.decide([_hello(0), _hello(2), other])
    assert not verdict.ok
    assert needle in verdict.message


def test_mixed_storage_and_fsdp_on_node_local_directories_are_refused():
    mixed = meeting.decide([_hello(0), _hello(1), _hello(2, shared=False, steps=[])])
    assert not mixed.ok and "node(s) 1 see" in mixed.message and "node(s) 2 do not" in mixed.message
    fsdp = meeting.decide([_hello(0), _hello(1, shared=False, steps=[])],
                        {meeting.NODE_LOCAL: "FSDP needs a shared filesystem"})
    assert not fsdp.ok and fsdp.message == "FSDP needs a shared filesystem"


def _meet(nnodes: int, hellos: dict, on_go=lambda verdict: None, timeout: float = 20):
    """Node 0 serving in this thread, the other nodes joining from threads."""
    port = free_port()
    answers: dict = {}

    def other(rank):
        try:
            answers[rank] = meeting.join("127.0.0.1", port, timeout,
                                       lambda launch_id: {**hellos[rank], "launch": launch_id},
                                       log=lambda _: None)
        except UserError as exc:
            answers[rank] = exc

    threads = [threading.Thread(target=other, args=(r,)) for r in range(1, nnodes)
               if r in hellos]
    for thread in threads:
        thread.start()
    seen = []

    def decide(others):
        seen.extend(others)
        return meeting.decide([hellos[0], *others])

    try:
        verdict = meeting.serve("127.0.0.1", port, nnodes, "launch-1", timeout, decide, on_go,
                              log=lambda _: None)
    except UserError as exc:
        verdict = exc
    for thread in threads:
        thread.join(timeout=30)
    return verdict, answers, seen, port


def test_every_node_gets_node_0s_verdict_and_the_port_is_free_afterwards():
    hellos = {0: _hello(0, steps=[5]), 1: _hello(1), 2: _hello(2)}
    written = []
    verdict, answers, seen, port = _meet(3, hellos, on_go=written.append)
    assert verdict.ok and verdict.resume_step == 5
    assert [h["node_rank"] for h in seen] == [1, 2] and {h["launch"] for h in seen} == {"launch-1"}
    assert written == [verdict]  # the run files were written before anyone was told to go
    assert answers[1] == verdict and answers[2] == verdict
    from ftlaunch.launch.process import check_port_free

    check_port_free(port)  # torchrun can take the port over now


def test_a_refusal_reaches_every_node():
    verdict, answers, _, _ = _meet(2, {0: _hello(0), 1: _hello(1, plan="sha256:bbb")})
    assert not verdict.ok and not answers[1].ok and answers[1].message == verdict.message


def test_a_failure_writing_the_run_files_is_sent_as_the_refusal():
    def on_go(verdict):
        raise UserError("no space left for run.yaml")

    verdict, answers, _, _ = _meet(2, {0: _hello(0), 1: _hello(1)}, on_go=on_go)
    assert isinstance(verdict, UserError) and "no space left" in str(verdict)
    assert not answers[1].ok and "node 0 could not start: no space left" in answers[1].message


def test_missing_nodes_and_a_missing_node_0_time_out_with_a_user_error():
    verdict, _, _, _ = _meet(3, {0: _hello(0), 1: _hello(1)}, timeout=2)
    assert isinstance(verdict, UserError) and "node(s) 2 did not join within 2 s" in str(verdict)
    with pytest.raises(UserError, match="node 0 did not answer"):
        meeting.join("127.0.0.1", free_port(), 1.5, lambda launch_id: _hello(1), log=lambda _: None)


def test_a_busy_port_on_node_0_is_a_user_error():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"--master-port {port} is already in use"):
            meeting.serve("127.0.0.1", port, 2, "x", 1, lambda o: None, lambda v: None,
                        log=lambda _: None)


def test_a_launch_mark_tells_a_node_it_shares_the_directory(tmp_path):
    launch_id = meeting.mark_launch(tmp_path)
    assert meeting.sees_launch(tmp_path, launch_id)
    assert not meeting.sees_launch(tmp_path, "another-launch")
    second = meeting.mark_launch(tmp_path)
    assert not meeting.sees_launch(tmp_path, launch_id)  # an earlier launch's mark is gone
    meeting.unmark_launch(tmp_path, second)
    assert not any(tmp_path.iterdir())


def test_loopback_rendezvous_listens_on_loopback_only():
    assert meeting.bind_host("127.0.0.1") == "127.0.0.1"
    assert meeting.bind_host("localhost") == "127.0.0.1"
    assert meeting.bind_host(None) == "127.0.0.1"
    assert meeting.bind_host("10.1.2.3") == ""  # a real address: every interface, like torchrun
