"""Multi-node context from flags and scheduler variables (pure), and through the CLI."""

from __future__ import annotations

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from conftest import run_ftlaunch
from ftlaunch import cluster
from ftlaunch.errors import UserError

SLURM = {"SLURM_JOB_ID": "981234", "SLURM_NNODES": "4", "SLURM_NODEID": "2",
         "SLURM_JOB_NODELIST": "gpu[07-09,12]"}


def test_slurm_gives_nodes_rank_first_host_and_a_job_derived_port():
    ctx = cluster.from_env(SLURM)
    assert (ctx.nnodes, ctx.node_rank, ctx.master_addr) == (4, 2, "gpu07")
    assert ctx.master_port == 20000 + 981234 % 10000  # the same on every node of the job
    assert ctx.source == "SLURM"


@pytest.mark.parametrize("nodelist, first", [
    ("gpu[07-09,12]", "gpu07"), ("node1,node2", "node1"), ("a-b-c[001-004]", "a-b-c001"),
    ("single", "single")])
def test_first_host_of_a_nodelist(nodelist, first):
    assert cluster.first_host(nodelist) == first


def test_torchrun_style_and_pytorchjob_variables():
    ctx = cluster.from_env({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.1.0.4",
                            "MASTER_PORT": "29400"})
    assert (ctx.nnodes, ctx.node_rank, ctx.master_addr, ctx.master_port) == (2, 1, "10.1.0.4", 29400)
    job = cluster.from_env({"WORLD_SIZE": "3", "RANK": "0", "MASTER_ADDR": "head"})
    assert (job.nnodes, job.node_rank) == (3, 0)
    # Inside a torchrun worker WORLD_SIZE counts processes, not nodes: not a node context.
    assert cluster.from_env({"WORLD_SIZE": "8", "RANK": "3", "MASTER_ADDR": "x",
                             "LOCAL_RANK": "3"}) is None
    assert cluster.from_env({}) is None


def test_flags_win_and_bad_contexts_are_user_errors():
    ctx = cluster.resolve(SLURM, nnodes=2, node_rank=0, master_addr="h0", master_port=None)
    assert (ctx.nnodes, ctx.node_rank, ctx.master_addr, ctx.source) == (2, 0, "h0", "flags")
    with pytest.raises(UserError, match="between 0 and"):
        cluster.resolve({}, nnodes=2, node_rank=2, master_addr="h0", master_port=None)
    with pytest.raises(UserError, match="--master-addr"):
        cluster.resolve({}, nnodes=2, node_rank=1, master_addr=None, master_port=None)
    with pytest.raises(UserError, match="not a number"):
        cluster.from_env({"SLURM_JOB_ID": "1", "SLURM_NNODES": "two"})


def test_a_slurm_node_renders_its_rank_and_rendezvous(tmp_path):
    out = tmp_path / "run"
    proc = run_ftlaunch("--model", "tiny", "--dry-run", "--output-dir", str(out),
                        env={**SLURM, "SLURM_NNODES": "2", "SLURM_NODEID": "1"})
    assert proc.returncode == 0, proc.stderr
    config = load_config_from_file(str(out / "accelerate.yaml"))
    assert (config.num_machines, config.machine_rank) == (2, 1)
    assert (config.main_process_ip, config.main_process_port) == ("gpu07", 20000 + 981234 % 10000)
    plan = yaml.safe_load((out / "run.yaml").read_text())["plan"]
    assert plan["num_machines"] == 2 and plan["num_processes"] == 2
