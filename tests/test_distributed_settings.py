"""What the plan implies for the workers' distributed settings, and that they are overridable."""

from __future__ import annotations

import yaml

from conftest import run_ftlaunch
from ftlaunch.plan import job as job_mod
from ftlaunch.launch import process
from ftlaunch.launch import run_files


def _job(model: str, hardware: str, *sets: str):
    return job_mod.resolve(job_mod.Options(model=model, method="lora", hardware=hardware,
                                           sets=tuple(sets)), validate=False)


def test_collective_timeout_grows_with_the_weights_a_rank_may_wait_for():
    small = run_files.collective_timeout_s(_job("llama-8b", "8xH100-80GB"))
    big = run_files.collective_timeout_s(_job("llama-70b", "8xH100-80GB"))
    assert small == 600  # 16 GB of weights: ten minutes are plenty
    # 70.6e9 parameters x 2 bytes, read twice at 100 MB/s: about 47 minutes.
    assert 2700 < big < 2900
    assert run_files.collective_timeout_s(_job("llama-70b", "8xH100-80GB", "ddp_timeout=7200")) == 7200


def test_nccl_defaults_for_gpu_jobs_and_the_environment_wins():
    gpus = _job("llama-8b", "8xH100-80GB").plan
    assert process.distributed_env(gpus, {}) == {"NCCL_DEBUG": "WARN",
                                                 "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    mine = {"NCCL_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "ens5", "HOME": "/root"}
    env = process.distributed_env(gpus, mine)
    assert env["NCCL_DEBUG"] == "INFO" and env["NCCL_SOCKET_IFNAME"] == "ens5"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and "HOME" not in env
    one_gpu = _job("llama-8b", "1xH100-80GB").plan
    assert process.distributed_env(one_gpu, {}) == {}  # nothing to communicate with
    worker = process.worker_env(8, 64, on_cpu=False, offline=False, distributed=env)
    assert worker["NCCL_SOCKET_IFNAME"] == "ens5" and worker["NCCL_DEBUG"] == "INFO"


def test_the_settings_are_recorded_and_reach_the_trainer(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_ftlaunch("--model", "tiny", "--dry-run", "--output-dir", str(run_dir),
                        "--set", "ddp_timeout=1234", env={"GLOO_SOCKET_IFNAME": "lo"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert record["distributed"] == {"timeout_s": 1234, "env": {"GLOO_SOCKET_IFNAME": "lo"}}
    from ftlaunch.run import record as run_record
    from ftlaunch.worker.setup import training_config

    config = training_config(run_dir, run_record.load(run_dir))
    assert config.ddp_timeout == 1234 and config.save_on_each_node is False


def test_a_node_with_the_other_transformers_names_checkpointing_its_own_way():
    """The launcher names gradient checkpointing as its transformers does; a node whose
    transformers has only the other name (5.2x renamed it) uses that one."""
    import dataclasses

    from ftlaunch.worker.setup import own_checkpointing_names

    @dataclasses.dataclass
    class Older:
        gradient_checkpointing: bool = False
        gradient_checkpointing_kwargs: dict | None = None

    @dataclasses.dataclass
    class Newer:
        activation_checkpointing: bool = False
        activation_checkpointing_kwargs: dict | None = None

    launcher_new = {"activation_checkpointing": True,
                    "activation_checkpointing_kwargs": {"use_reentrant": False}, "seed": 3}
    assert Older(**{k: v for k, v in own_checkpointing_names(launcher_new, Older).items()
                    if k != "seed"}).gradient_checkpointing is True
    launcher_old = {"gradient_checkpointing": True}
    assert own_checkpointing_names(launcher_old, Newer) == {"activation_checkpointing": True}
    assert own_checkpointing_names(launcher_new, Newer) == launcher_new
