"""One-line summaries the commands print: the plan as `train` starts it, and the cluster
this node is part of (`plan`, `hardware`). The full plan table is show/report.py's."""

from __future__ import annotations

from ftlaunch.units import GIB, format_gib


def plan_summary(p) -> str:
    """A plan (plan.planner.Plan) in one line."""
    return (f"ftlaunch plan: {p.model_id} | {p.method} on {p.engine} x{p.num_processes} | "
            f"micro-batch {p.per_device_batch_size} x accumulation {p.gradient_accumulation_steps} "
            f"= global {p.global_batch_size} | seq {p.seq_len} | "
            f"peak {p.memory.total / GIB:.2f} of {format_gib(p.budget_bytes, 2)} per device")


def cluster_line(context) -> str:
    """A multi-node context (detect.cluster) in one line."""
    return (f"Multi-node ({context.source}): {context.nnodes} nodes, this is node "
            f"{context.node_rank}, node 0 at {context.master_addr}:{context.master_port}")
