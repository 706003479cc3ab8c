"""Multi-node context: how many nodes, which one this is, where rank 0 listens.

Read from flags first, else from the scheduler's environment, so the same
`ftlaunch` command works unchanged on every node of a SLURM allocation or a
Kubernetes PyTorchJob:

    SLURM:        SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST (first host is rank 0),
                  port MASTER_PORT or derived from SLURM_JOB_ID (the same on every node)
    torchrun-style / Kubeflow: NNODES or PET_NNODES, NODE_RANK / PET_NODE_RANK /
                  GROUP_RANK, MASTER_ADDR, MASTER_PORT; or a PyTorchJob's
                  WORLD_SIZE + RANK (one ftlaunch per pod) when no LOCAL_RANK says
                  we are already inside a worker.
Pure: the environment is passed in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from ftlaunch.errors import UserError


DEFAULT_PORT = 29500


@dataclass(frozen=True)
class ClusterContext:
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    source: str = "single node"


def resolve(env: Mapping[str, str], nnodes: int | None, node_rank: int | None,
            master_addr: str | None, master_port: int | None) -> ClusterContext:
    """Flags win over the environment, key by key."""
    found = from_env(env) or ClusterContext()
    context = ClusterContext(
        nnodes=nnodes if nnodes is not None else found.nnodes,
        node_rank=node_rank if node_rank is not None else found.node_rank,
        master_addr=master_addr or found.master_addr,
        master_port=master_port or found.master_port,
        source="flags" if nnodes is not None else found.source,
    )
    flags = context.source == "flags" or node_rank is not None
    if context.nnodes < 1:
        raise UserError(f"--nnodes {context.nnodes} (from {context.source}) must be at least 1: "
                        "the number of machines in the job.")
    if not 0 <= context.node_rank < context.nnodes:
        named = (f"--node-rank {context.node_rank} with --nnodes {context.nnodes}" if flags
                 else f"node rank {context.node_rank} of {context.nnodes} nodes")
        raise UserError(f"{named} (from {context.source}): a node's rank must be between 0 and "
                        f"{context.nnodes - 1}. Number the machines 0 to {context.nnodes - 1}, "
                        "node 0 being the one at --master-addr.")
    if context.master_port is not None and not 1 <= context.master_port <= 65535:
        raise UserError(f"--master-port {context.master_port} is not a TCP port: use one "
                        "between 1 and 65535 that is free on node 0 (below 1024 only as root).")
    if context.nnodes > 1 and not context.master_addr:
        raise UserError(f"{context.nnodes} nodes need the address of node rank 0: pass "
                        "--master-addr HOST (the same on every node).")
    if context.nnodes > 1 and context.master_port is None:
        # Every node must name the same port without talking first: torchrun's default.
        context = replace(context, master_port=DEFAULT_PORT)
    return context


def from_env(env: Mapping[str, str]) -> ClusterContext | None:
    try:
        if env.get("SLURM_JOB_ID") and (env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")):
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
            port = env.get("MASTER_PORT") or 20000 + int(env["SLURM_JOB_ID"]) % 10000
            return ClusterContext(
                nnodes=int(env.get("SLURM_NNODES") or env["SLURM_JOB_NUM_NODES"]),
                node_rank=int(env.get("SLURM_NODEID", "0")),
                master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
                master_port=int(port),
                source="SLURM",
            )
        nnodes = env.get("NNODES") or env.get("PET_NNODES")
        if nnodes:
            rank = env.get("NODE_RANK") or env.get("PET_NODE_RANK") or env.get("GROUP_RANK") or "0"
            return ClusterContext(nnodes=int(nnodes.split(":")[-1]), node_rank=int(rank),
                                  master_addr=env.get("MASTER_ADDR"),
                                  master_port=_int(env.get("MASTER_PORT")),
                                  source="NNODES/NODE_RANK")
        if env.get("WORLD_SIZE") and env.get("RANK") and env.get("MASTER_ADDR") \
                and not env.get("LOCAL_RANK"):
            return ClusterContext(nnodes=int(env["WORLD_SIZE"]), node_rank=int(env["RANK"]),
                                  master_addr=env["MASTER_ADDR"],
                                  master_port=_int(env.get("MASTER_PORT")),
                                  source="WORLD_SIZE/RANK (one ftlaunch per pod)")
    except ValueError as exc:
        raise UserError(f"A multi-node environment variable is not a number: {exc}.") from None
    return None


def first_host(nodelist: str) -> str | None:
    """The first host of a SLURM nodelist: `gpu[07-09,12],cpu3` -> `gpu07`,
    `rack[1-2]-n[01-04]-ib` -> `rack1-n01-ib` (every bracket takes its first number)."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # the first name: up to a comma outside brackets
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    name = nodelist[:end].strip()
    if not name:
        return None
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], name)


def _int(value: str | None) -> int | None:
    return int(value) if value else None
