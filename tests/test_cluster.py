"""Multi-node context from flags and scheduler variables (pure), and through the CLI."""

from __future__ import annotations

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from conftest import run_ftlaunch
from ftlaunch.detect import cluster
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
    ("single", "single"), ("gpu[07-09]-ib", "gpu07-ib"), ("rack[1-2]-n[01-04]", "rack1-n01"),
    ("x[3,5-6]-y,z1", "x3-y")])
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


SLURM_2x8 = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
             "SLURM_JOB_NODELIST": "gpu-a[01-02]"}


def test_a_slurm_2x8_allocation_plans_16_processes_on_2_machines_from_either_node(tmp_path):
    import json

    for rank in ("0", "1"):
        proc = run_ftlaunch("plan", "--model", "llama-8b", "--hardware", "8xA100-80GB", "--json",
                            env={**SLURM_2x8, "SLURM_NODEID": rank})
        assert proc.returncode == 0, proc.stderr
        plan = json.loads(proc.stdout)
        assert (plan["num_machines"], plan["num_processes"]) == (2, 16)
        assert plan["hardware"]["nodes"] == 2 and plan["hardware"]["gpus_per_node"] == 8
        assert plan["cluster"] == {"nnodes": 2, "node_rank": int(rank), "master_addr": "gpu-a01",
                                   "master_port": 20000 + 4242 % 10000, "source": "SLURM"}
    # The same, described as 2 nodes, is the same plan; a description that contradicts
    # the allocation is refused.
    both = run_ftlaunch("plan", "--model", "llama-8b", "--hardware", "2x8xA100-80GB", "--json",
                        env=SLURM_2x8)
    assert json.loads(both.stdout)["num_processes"] == 16
    wrong = run_ftlaunch("plan", "--model", "llama-8b", "--hardware", "3x8xA100-80GB",
                         env=SLURM_2x8)
    assert wrong.returncode == 2 and "describes 3 nodes, but SLURM says 2" in wrong.stderr


def test_the_2x8_config_written_on_node_1_passes_accelerates_loader(tmp_path):
    out = tmp_path / "run"
    proc = run_ftlaunch("--model", "llama-8b", "--random-init", "--method", "lora",
                        "--hardware", "8xA100-80GB", "--dry-run", "--output-dir", str(out),
                        env=SLURM_2x8)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = load_config_from_file(str(out / "accelerate.yaml"))
    assert (config.num_machines, config.num_processes, config.machine_rank) == (2, 16, 1)
    assert (config.main_process_ip, config.main_process_port) == ("gpu-a01", 24242)
    # This node's launch names its rank and node 0 explicitly (every node can launch from
    # one shared accelerate.yaml): accelerate's own parser reads them from the command.
    import shlex

    from accelerate.commands.launch import launch_command_parser

    printed = proc.stdout.split("Launch command (dry run, nothing trained):")[1].strip()
    argv = shlex.split(printed.splitlines()[0])
    assert argv[1:3] == ["-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(argv[3:])
    assert (args.machine_rank, args.main_process_ip, args.main_process_port) == (1, "gpu-a01", 24242)
    assert args.config_file == str((out / "accelerate.yaml").resolve())


def test_several_nodes_without_a_port_agree_on_torchruns_default():
    env = {"NNODES": "2", "MASTER_ADDR": "head"}
    ports = {cluster.resolve({**env, "NODE_RANK": rank}, None, None, None, None).master_port
             for rank in ("0", "1")}
    assert ports == {29500}
    assert cluster.resolve({}, None, None, None, None).master_port is None  # one node picks freely


def test_hardware_is_only_described_for_planning_not_for_training(tmp_path):
    proc = run_ftlaunch("--model", "tiny", "--hardware", "8xA100-80GB",
                        "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 2 and "with --dry-run" in proc.stderr
    assert not (tmp_path / "run").exists()
