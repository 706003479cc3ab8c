"""The nodes of a multi-node job meet before any worker starts.

Every node runs the same `ftlaunch` command and plans on its own. Before the
workers start, node 0 listens on --master-port (torchrun takes the port over
afterwards) and each other node connects and says what it is:

    node 0 -> node R   {"launch_id": ...}     which launch this is
    node R -> node 0   hello                  hardware, plan hash, version, data,
                                              whether it sees node 0's run directory,
                                              the complete checkpoints it holds, or
                                              the error its own preflight ended in
    node 0 -> node R   verdict                go (storage mode, the checkpoint every
                                              node resumes from) or the refusal

So a node with other GPUs, another plan, another ftlaunch or other data is
refused on every node with exit 2, naming the node and the difference, before
a worker exists, instead of surfacing as an NCCL timeout twenty minutes in.

Whether the run directory is shared is found out, not configured: node 0 puts
a file named after this launch into its run directory, and a node that sees
that name under its own --output-dir shares it (a new name is never in a
network filesystem's negative lookup cache, unlike a re-written run.yaml).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ftlaunch.errors import UserError
from ftlaunch.run.directory import LAUNCH_MARK
from ftlaunch.run.record import NODE_LOCAL, SHARED

PROTOCOL = 1
_LINE_LIMIT = 1 << 20
_WELCOME_S = 15.0


@dataclass(frozen=True)
class Verdict:
    ok: bool
    message: str = ""
    storage: str = SHARED
    resume_step: int | None = None  # newest checkpoint complete on every node, or None
    nodes: tuple[dict, ...] = ()  # every node's hello, by node rank
    cause: dict | None = None  # a restart's: the failure every node names (launch.restarts)

    def to_json(self) -> dict:
        return {"ok": self.ok, "message": self.message, "storage": self.storage,
                "resume_step": self.resume_step, "nodes": list(self.nodes), "cause": self.cause}

    @classmethod
    def from_json(cls, data: dict) -> Verdict:
        return cls(ok=bool(data["ok"]), message=data.get("message", ""),
                   storage=data.get("storage", SHARED), resume_step=data.get("resume_step"),
                   nodes=tuple(data.get("nodes", ())), cause=data.get("cause"))


def hello(node_rank: int, hardware, plan_hash: str, version: str, run_dir: Path,
          data_fingerprint: str | None, shared: bool, steps: list[int] | None,
          error: str | None = None, max_restarts: int | None = None) -> dict:
    """What a node says about itself. `hardware` is a Hardware; only what the plan
    depends on is compared (GPU model, count and memory), not RAM or free disk.
    `steps`: the complete checkpoints in this node's own run directory (None when it
    shares node 0's)."""
    return {
        "protocol": PROTOCOL,
        "node_rank": node_rank,
        "host": socket.gethostname(),
        "ftlaunch": version,
        "gpus": _gpu_facts(hardware),
        "hardware": hardware.describe(),
        "plan_hash": plan_hash,
        "run_dir": str(run_dir),
        "data": data_fingerprint,
        "shared": shared,
        "steps": None if steps is None else sorted(steps),
        "error": error,
        "max_restarts": max_restarts,
    }


def _gpu_facts(hardware) -> dict:
    return {"per_node": hardware.gpus_per_node,
            "name": hardware.gpu.name if hardware.gpu else None,
            "memory_bytes": hardware.gpu.memory_bytes if hardware.gpu else 0}


def decide(hellos: list[dict], storage_ok: dict[str, str | None] | None = None) -> Verdict:
    """Node 0's decision over every node's hello (hellos[0] is node 0's own).

    `storage_ok` maps a storage mode to why this plan cannot use it (None: it can)."""
    mine = hellos[0]
    problems = []
    for other in hellos[1:]:
        name = f"node {other['node_rank']} ({other['host']})"
        if other.get("error"):
            problems.append(f"{name} failed its own preflight: {other['error']}")
            continue
        if other.get("protocol") != PROTOCOL or other["ftlaunch"] != mine["ftlaunch"]:
            problems.append(f"{name} runs ftlaunch {other['ftlaunch']}, node 0 runs "
                            f"{mine['ftlaunch']}: install the same version on every node")
            continue
        if other["gpus"] != mine["gpus"]:
            problems.append(f"{name} has {other['hardware']}, node 0 has {mine['hardware']}: "
                            "every node must have the same GPUs (the plan is made for one "
                            "kind of node)")
            continue
        if other["plan_hash"] != mine["plan_hash"]:
            problems.append(f"{name} made a different plan ({other['plan_hash']}, node 0 "
                            f"{mine['plan_hash']}): run the same command, with the same "
                            "flags, recipe and --gpus, on every node")
        if other.get("max_restarts") != mine.get("max_restarts"):
            problems.append(f"{name} has --max-restarts {other.get('max_restarts')}, node 0 "
                            f"{mine.get('max_restarts')}: the nodes restart together, so give "
                            "every node the same")
        if other.get("data") and mine.get("data") and other["data"] != mine["data"]:
            problems.append(f"{name} reads different training data ({other['data']}, node 0 "
                            f"{mine['data']}): give every node the same file")
    if problems:
        return Verdict(False, "; ".join(problems) + ".", nodes=tuple(hellos))
    shared = [bool(h["shared"]) for h in hellos[1:]]
    if any(shared) and not all(shared):
        seeing = ", ".join(str(h["node_rank"]) for h in hellos[1:] if h["shared"])
        blind = ", ".join(str(h["node_rank"]) for h in hellos[1:] if not h["shared"])
        return Verdict(False, f"node(s) {seeing} see node 0's run directory and node(s) {blind} "
                       "do not: mount the same shared filesystem at the same path on every node "
                       "(recommended), or give every node a directory of its own.",
                       nodes=tuple(hellos))
    storage = SHARED if all(shared) else NODE_LOCAL
    if storage == SHARED:
        elsewhere = [h for h in hellos[1:] if h["run_dir"] != mine["run_dir"]]
        if elsewhere:
            return Verdict(False, "; ".join(
                f"node {h['node_rank']} sees the shared run directory as {h['run_dir']}, node 0 "
                f"as {mine['run_dir']}" for h in elsewhere) + ": mount the shared filesystem at "
                "the same path on every node (the run files name absolute paths).",
                storage=storage, nodes=tuple(hellos))
    why_not = (storage_ok or {}).get(storage)
    if why_not:
        return Verdict(False, why_not, storage=storage, nodes=tuple(hellos))
    common = set(mine["steps"])
    for other in hellos[1:]:
        if other["steps"] is not None:
            common &= set(other["steps"])
    return Verdict(True, storage=storage, resume_step=max(common) if common else None,
                   nodes=tuple(hellos))


def mark_launch(run_dir: Path) -> str:
    """Node 0: a fresh launch id, and the file that lets other nodes see they share
    this directory. Earlier launches' marks are removed."""
    launch_id = os.urandom(8).hex()
    for old in run_dir.glob(LAUNCH_MARK + "*"):
        old.unlink(missing_ok=True)
    (run_dir / f"{LAUNCH_MARK}{launch_id}").write_text(f"{socket.gethostname()}\n")
    return launch_id


def sees_launch(run_dir: Path, launch_id: str) -> bool:
    return (run_dir / f"{LAUNCH_MARK}{launch_id}").exists()


def unmark_launch(run_dir: Path, launch_id: str) -> None:
    (run_dir / f"{LAUNCH_MARK}{launch_id}").unlink(missing_ok=True)


def bind_host(master_addr: str | None) -> str:
    """Loopback rendezvous (tests, one machine) stays on loopback; otherwise listen on
    every interface, as torchrun's store does, since the other nodes may reach this one
    by any of its addresses."""
    if not master_addr:
        return "127.0.0.1"  # one node: nobody else needs to reach it
    try:
        infos = socket.getaddrinfo(master_addr, None, socket.AF_INET)
    except socket.gaierror:
        return ""
    if infos and all(info[4][0].startswith("127.") for info in infos):
        return infos[0][4][0]
    return ""


def serve(master_addr: str, port: int, nnodes: int, launch_id: str, timeout_s: float,
          decide_with, on_go, log=print, timeout_name: str = "--join-timeout") -> Verdict:
    """Node 0: wait for nodes 1..nnodes-1, decide with `decide_with(hellos_of_others)`;
    on a go, run `on_go(verdict)` (it writes the run files the other nodes' workers
    will read) before telling the nodes, so none starts before they exist. A UserError
    from on_go is sent to every node as the refusal. Returns the verdict; the port is
    free again when this returns."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((bind_host(master_addr), port))
    except OSError:
        listener.close()
        raise UserError(f"--master-port {port} is already in use on node 0, so the nodes cannot "
                        "meet there. Pick a free port, the same on every node.") from None
    listener.listen(nnodes)
    connections: dict[int, tuple] = {}  # node rank -> (socket, stream, hello)
    deadline = time.monotonic() + timeout_s
    log(f"ftlaunch: waiting for {nnodes - 1} more node(s) at {master_addr}:{port} "
        f"(up to {timeout_s:.0f} s)")
    try:
        while len(connections) < nnodes - 1:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(1, nnodes)) - set(connections))
                raise UserError(
                    f"node(s) {', '.join(map(str, missing))} did not join within "
                    f"{timeout_s:.0f} s ({timeout_name}). Start the same command on every node "
                    f"with --nnodes {nnodes} and a --node-rank of its own, and check that they "
                    f"reach {master_addr}:{port} (firewall, --master-addr).")
            listener.settimeout(min(remaining, 5.0))
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            # A hello can take a while: the node verifies the checkpoints it holds.
            conn.settimeout(max(remaining, 60))
            stream = conn.makefile("rwb")
            try:
                _send(stream, {"protocol": PROTOCOL, "launch_id": launch_id})
                other = _receive(stream)
            except (OSError, ValueError):
                _close(conn, stream)  # not one of ours (a port scan, a stale client): keep waiting
                continue
            rank = other.get("node_rank")
            if not isinstance(rank, int) or not 0 < rank < nnodes or rank in connections:
                _send(stream, Verdict(False, f"node rank {rank} is not one this job waits for "
                                     f"(1..{nnodes - 1}, each once)").to_json())
                _close(conn, stream)
                continue
            connections[rank] = (conn, stream, other)
            log(f"ftlaunch: node {rank} ({other.get('host')}) joined")
        verdict = decide_with([connections[r][2] for r in sorted(connections)])
        failure = None
        if verdict.ok:
            try:
                on_go(verdict)
            except UserError as exc:
                failure = exc
                verdict = Verdict(False, f"node 0 could not start: {exc}", nodes=verdict.nodes)
        for _conn, stream, _ in connections.values():
            try:
                _send(stream, verdict.to_json())
                stream.read(1)  # the other side closes first: the port is left without TIME_WAIT
            except OSError:
                pass
        if failure is not None:
            raise failure
        return verdict
    finally:
        # The stream too: a socket with a makefile() open is not really closed, and the
        # waiting nodes would not learn that node 0 is gone.
        for conn, stream, _ in connections.values():
            _close(conn, stream)
        listener.close()


def join(master_addr: str, port: int, timeout_s: float, make_hello, log=print,
         verdict_timeout_s: float | None = None, timeout_name: str = "--join-timeout") -> Verdict:
    """Node R: connect to node 0 (retrying until it listens), say hello, get the verdict.
    `make_hello(launch_id)` builds the hello once this node knows which launch it joins.
    `verdict_timeout_s`: how long to wait for the verdict once the hello is sent (None:
    as long as node 0 keeps the connection open)."""
    deadline = time.monotonic() + timeout_s
    log(f"ftlaunch: joining node 0 at {master_addr}:{port} (up to {timeout_s:.0f} s)")
    while True:
        try:
            conn = socket.create_connection((master_addr, port), timeout=10)
        except OSError:
            if time.monotonic() > deadline:
                raise UserError(
                    f"node 0 did not answer at {master_addr}:{port} within {timeout_s:.0f} s "
                    f"({timeout_name}). Is the same ftlaunch command running there with "
                    "--node-rank 0? Its output says why it stopped if it did.") from None
            time.sleep(1.0)
            continue
        with conn, conn.makefile("rwb") as stream:
            # Node 0 welcomes at once; silence is something else on the port (the store
            # of a torchrun that is still ending, before a restart): try again.
            conn.settimeout(_WELCOME_S)
            try:
                welcome = _receive(stream)
                conn.settimeout(max(timeout_s, 60))
                _send(stream, make_hello(welcome["launch_id"]))
                # No limit on the first start's verdict: node 0 may be tokenizing a big
                # dataset; if it dies, the connection closes and that ends the wait. A
                # restart's has one: a node 0 that lost power closes nothing.
                conn.settimeout(verdict_timeout_s)
                return Verdict.from_json(_receive(stream))
            except (OSError, ValueError, KeyError):
                # node 0 stopped listening between its launches, or refused us mid-way
                if time.monotonic() > deadline:
                    raise UserError(f"node 0 at {master_addr}:{port} broke off the meeting "
                                    "of the nodes; see its output.") from None
                time.sleep(1.0)


def _close(conn, stream) -> None:
    try:
        stream.close()
    except OSError:
        pass
    conn.close()


def _send(stream, message: dict) -> None:
    stream.write(json.dumps(message).encode() + b"\n")
    stream.flush()


def _receive(stream) -> dict:
    line = stream.readline(_LINE_LIMIT)
    if not line.endswith(b"\n"):
        raise ValueError("connection closed")
    return json.loads(line)
