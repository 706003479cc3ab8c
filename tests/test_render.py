"""Plan -> accelerate.yaml, read back with accelerate's own config loader."""

import dataclasses
import json

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from ftlaunch.detect import hardware
from ftlaunch.launch import process
from ftlaunch.models import presets as models
from ftlaunch.plan import planner
from ftlaunch.launch import render
from ftlaunch.errors import UserError

MULTI_NODE = render.Rendezvous(machine_rank=1, main_process_ip="10.0.0.1",
                               main_process_port=29555)

CASES = {
    # id: (hardware spec, processes per node, rendezvous, expected engine,
    #      expected processes in all, expected machines)
    "cpu-1": ("cpu", None, render.Rendezvous(), "cpu", 1, 1),
    "cpu-2": ("cpu", 2, render.Rendezvous(main_process_port=29601), "cpu", 2, 1),
    "a100-single": ("1xA100-80GB", None, render.Rendezvous(), "single", 1, 1),
    "a100x4-ddp": ("4xA100-80GB", None, render.Rendezvous(main_process_port=29602), "ddp",
                   4, 1),
    "2x8xa100-ddp": ("2x8xA100-80GB", None, MULTI_NODE, "ddp", 16, 2),
}


def _plan(spec, processes):
    return planner.plan(hardware.parse_spec(spec), models.resolve("tiny"),
                        planner.TrainSpec(processes_per_node=processes))


@pytest.mark.parametrize("case", list(CASES))
def test_accelerate_reads_the_rendered_config(case, tmp_path):
    spec, processes, rendezvous, engine, num_processes, num_machines = CASES[case]
    plan = _plan(spec, processes)
    assert plan.engine == engine
    assert (plan.num_processes, plan.num_machines) == (num_processes, num_machines)
    path = render.write_accelerate_config(plan, rendezvous, tmp_path)
    assert path == tmp_path / "accelerate.yaml"

    config = load_config_from_file(str(path))

    assert config.num_processes == plan.num_processes
    assert config.num_machines == plan.num_machines
    assert config.machine_rank == rendezvous.machine_rank
    if plan.num_processes == 1:
        assert config.distributed_type == DistributedType.NO
    else:
        assert config.distributed_type == DistributedType.MULTI_GPU
        assert config.main_process_port == rendezvous.main_process_port
        assert config.main_process_ip == rendezvous.main_process_ip
    if plan.on_cpu:
        assert config.use_cpu is True
        assert config.mixed_precision == "no"
    else:
        assert not config.use_cpu
        assert config.mixed_precision == plan.precision


def test_fp16_card_gets_fp16(tmp_path):
    plan = planner.plan(hardware.parse_spec("1xV100-32GB"), models.resolve("tiny"),
                        planner.TrainSpec())
    config = load_config_from_file(str(render.write_accelerate_config(
        plan, render.Rendezvous(), tmp_path)))
    assert config.mixed_precision == "fp16"


def test_rewrite_replaces_the_file(tmp_path):
    render.write_accelerate_config(_plan("cpu", 2), render.Rendezvous(), tmp_path)
    path = render.write_accelerate_config(_plan("cpu", None), render.Rendezvous(), tmp_path)
    config = load_config_from_file(str(path))
    assert config.num_processes == 1
    assert config.distributed_type == DistributedType.NO


def test_file_is_plain_yaml_with_a_header(tmp_path):
    path = render.write_accelerate_config(_plan("4xA100-80GB", None), render.Rendezvous(),
                                          tmp_path)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Written by ftlaunch")
    assert yaml.safe_load(text)["num_processes"] == 4


@pytest.mark.parametrize("plan, name", [
    (lambda: _plan("cpu", None), "cpu"),
    (lambda: _plan("cpu", 2), "cpu-ddp"),
    (lambda: _plan("1xA100-80GB", None), "single"),
    (lambda: _plan("4xA100-80GB", None), "ddp"),
])
def test_template_names(plan, name):
    assert render.template_name(plan()) == name


@pytest.mark.parametrize("engine, zero_stage", [("deepspeed", 1), ("deepspeed", None),
                                                 ("megatron", None)])
def test_unlaunchable_engine_is_a_user_error(engine, zero_stage):
    plan = dataclasses.replace(_sharded_base(), engine=engine, zero_stage=zero_stage)
    with pytest.raises(UserError):
        render.template_name(plan)


# --- Sharded engines -----------------------------------------------------------------
# The plans come from the real planner, then get the engine under test set directly:
# what the planner picks for a case is its business (and tested in test_planner.py);
# here only the rendering of each engine is.


def _sharded_base(spec: str = "8xH100-80GB"):
    return planner.plan(hardware.parse_spec(spec), models.resolve("llama-3.1-70b"),
                        planner.TrainSpec(method="qlora", engine="fsdp"))


def _fsdp(offload=False, spec="8xH100-80GB"):
    return dataclasses.replace(_sharded_base(spec), engine="fsdp", zero_stage=None,
                               offload=offload)


def _deepspeed(stage, offload=False, spec="8xH100-80GB", **changes):
    return dataclasses.replace(_sharded_base(spec), engine="deepspeed", zero_stage=stage,
                               offload=offload, **changes)


def _launch_env(config_path):
    """The environment `accelerate launch` gives the workers for this config file."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (prepare_deepspeed_cmd_env, prepare_multi_gpu_env,
                                         prepare_simple_launcher_cmd_env)

    args = launch_command_parser().parse_args(["--config_file", str(config_path), "train.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        # As launch_command does: accelerate refuses these beside a deepspeed_config_file.
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return prepare_deepspeed_cmd_env(args)[1]
    if args.num_processes == 1 and args.num_machines == 1:
        return prepare_simple_launcher_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


SINGLE_PROCESS = {
    "cpu": ("cpu", "lora"),
    "a100-bf16": ("1xA100-80GB", "lora"),
    "a100-qlora": ("1xA100-80GB", "qlora"),
    "v100-fp16": ("1xV100-32GB", "lora"),
}


@pytest.mark.parametrize("case", list(SINGLE_PROCESS))
@pytest.mark.parametrize("omp", [None, "3"])
def test_a_single_process_starts_with_accelerate_launchs_environment(case, omp, tmp_path,
                                                                     monkeypatch):
    """The worker of a one-process plan is started directly (process.single_process_env):
    it must get exactly what accelerate launch would have given it."""
    spec, method = SINGLE_PROCESS[case]
    plan = planner.plan(hardware.parse_spec(spec), models.resolve("tiny"),
                        planner.TrainSpec(method=method))
    assert plan.num_processes == 1
    path = render.write_accelerate_config(plan, render.Rendezvous(), tmp_path)
    base = {"PATH": "/usr/bin", "HOME": "/root", **({"OMP_NUM_THREADS": omp} if omp else {})}
    monkeypatch.setattr("os.environ", dict(base))
    ours = process.single_process_env(path, dict(base))
    assert ours == _launch_env(path)
    assert ours["ACCELERATE_USE_CPU"] == str(plan.on_cpu)
    argv = process.command(path, tmp_path, None, None, direct=True)
    assert argv[1:4] == ["-m", "ftlaunch.worker.main", "--run-dir"]


@pytest.mark.parametrize("make", [
    lambda: (_plan("cpu", 2), render.Rendezvous()),
    lambda: (_fsdp(), render.Rendezvous()),
    lambda: (_deepspeed(3), render.Rendezvous()),
    lambda: (_plan("2x8xA100-80GB", None), MULTI_NODE),
], ids=["cpu-2", "fsdp", "zero3", "multi-node"])
def test_other_configs_go_through_accelerate_launch(make, tmp_path):
    plan, rendezvous = make()
    path = render.write_accelerate_config(plan, rendezvous, tmp_path)
    assert process.single_process_env(path, {}) is None


def test_a_config_key_it_does_not_know_leaves_it_to_accelerate(tmp_path):
    path = render.write_accelerate_config(_plan("cpu", None), render.Rendezvous(), tmp_path)
    assert process.single_process_env(path, {}) is not None
    config = yaml.safe_load(path.read_text())
    config["dynamo_config"] = {"dynamo_backend": "INDUCTOR"}
    path.write_text(yaml.safe_dump(config))
    assert process.single_process_env(path, {}) is None


def test_real_planner_builds_the_base_plans():
    assert _sharded_base().num_processes == 8
    assert _sharded_base("2x8xH100-80GB").num_processes == 16


@pytest.mark.parametrize("offload", [False, True])
def test_fsdp_config(offload, tmp_path):
    plan = _fsdp(offload)
    assert render.template_name(plan) == "fsdp"
    path = render.write_accelerate_config(plan, render.Rendezvous(main_process_port=29603),
                                          tmp_path)
    assert not (tmp_path / render.DS_CONFIG_FILE).exists()

    config = load_config_from_file(str(path))
    assert config.distributed_type == DistributedType.FSDP
    assert config.num_processes == 8 and config.num_machines == 1
    assert config.main_process_port == 29603
    assert config.mixed_precision == plan.precision
    fsdp = config.fsdp_config
    assert fsdp["fsdp_offload_params"] is offload
    assert fsdp["fsdp_use_orig_params"] is False
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True
    assert fsdp["fsdp_sync_module_states"] is True
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert fsdp["fsdp_version"] == 1

    # What the workers get from `accelerate launch`, which is what the FSDP plugin reads.
    env = _launch_env(path)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_VERSION"] == "1"
    assert env["FSDP_OFFLOAD_PARAMS"] == str(offload).lower()
    assert env["FSDP_USE_ORIG_PARAMS"] == "false"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["ACCELERATE_MIXED_PRECISION"] == plan.precision


def test_fsdp_multi_node(tmp_path):
    plan = _fsdp(spec="2x8xH100-80GB")
    config = load_config_from_file(str(render.write_accelerate_config(plan, MULTI_NODE,
                                                                      tmp_path)))
    assert config.distributed_type == DistributedType.FSDP
    assert (config.num_processes, config.num_machines, config.machine_rank) == (16, 2, 1)
    assert (config.main_process_ip, config.main_process_port) == ("10.0.0.1", 29555)


def _validated_ds_config(path, world_size, monkeypatch):
    """DeepSpeed's own validation of a ds_config.json, as on a `world_size`-process job.

    DeepSpeedConfig asks torch.distributed for the world size (1 when it is not
    initialised), and checks train_batch_size against it: give it the job's.
    """
    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(deepspeed.comm, "get_world_size", lambda *a, **k: world_size)
    return DeepSpeedConfig(json.loads(path.read_text(encoding="utf-8")))


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


@pytest.mark.parametrize("stage, offload", [(2, False), (2, True), (3, False), (3, True)])
def test_deepspeed_config(stage, offload, tmp_path, monkeypatch):
    plan = _deepspeed(stage, offload, per_device_batch_size=2, gradient_accumulation_steps=4,
                      global_batch_size=64)
    assert render.template_name(plan) == f"deepspeed-zero{stage}"
    path = render.write_accelerate_config(plan, render.Rendezvous(main_process_port=29604),
                                          tmp_path, {"max_grad_norm": 0.3})
    ds_path = tmp_path / render.DS_CONFIG_FILE

    config = load_config_from_file(str(path))
    assert config.distributed_type == DistributedType.DEEPSPEED
    assert config.num_processes == 8
    assert config.deepspeed_config["deepspeed_config_file"] == str(ds_path.resolve())
    assert config.deepspeed_config["zero3_init_flag"] is (stage == 3)
    # Precision is the ds_config's: accelerate refuses a mixed_precision beside the file.
    assert config.mixed_precision is None
    env = _launch_env(path)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(ds_path.resolve())
    assert "mixed_precision" not in env["ACCELERATE_CONFIG_DS_FIELDS"]

    raw = json.loads(ds_path.read_text(encoding="utf-8"))
    assert "auto" not in set(_strings(raw))
    assert "optimizer" not in raw and "scheduler" not in raw  # the Trainer makes both
    ds = _validated_ds_config(ds_path, plan.num_processes, monkeypatch)
    assert ds.train_micro_batch_size_per_gpu == 2
    assert ds.gradient_accumulation_steps == 4
    assert ds.train_batch_size == 2 * 4 * 8 == plan.global_batch_size
    assert ds.gradient_clipping == 0.3
    assert ds.zero_optimization_stage == stage
    assert ds.bfloat16_config.enabled is (plan.precision == "bf16")
    assert ds.float16_config.enabled is (plan.precision == "fp16")
    zero = ds.zero_config
    if offload:
        assert zero.offload_optimizer is not None
        assert zero.offload_optimizer.device == "cpu"
    else:
        assert zero.offload_optimizer is None or zero.offload_optimizer.device == "none"
    if stage == 3:
        assert zero.gather_16bit_weights_on_model_save is True
        if offload:
            assert zero.offload_param.device == "cpu"
        else:
            assert zero.offload_param is None or zero.offload_param.device == "none"
    else:
        assert "offload_param" not in raw["zero_optimization"]


def test_deepspeed_gradient_clipping_defaults_to_the_trainers(tmp_path, monkeypatch):
    plan = _deepspeed(2)
    render.write_accelerate_config(plan, render.Rendezvous(), tmp_path)
    ds = _validated_ds_config(tmp_path / render.DS_CONFIG_FILE, plan.num_processes, monkeypatch)
    assert ds.gradient_clipping == 1.0  # TrainingArguments.max_grad_norm's default


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_deepspeed_precision(precision, tmp_path, monkeypatch):
    plan = _deepspeed(3, precision=precision)
    render.write_accelerate_config(plan, render.Rendezvous(), tmp_path)
    ds = _validated_ds_config(tmp_path / render.DS_CONFIG_FILE, plan.num_processes, monkeypatch)
    assert ds.bfloat16_config.enabled is (precision == "bf16")
    assert ds.float16_config.enabled is (precision == "fp16")


def test_deepspeed_multi_node(tmp_path, monkeypatch):
    plan = _deepspeed(3, spec="2x8xH100-80GB")
    config = load_config_from_file(str(render.write_accelerate_config(plan, MULTI_NODE,
                                                                      tmp_path)))
    assert config.distributed_type == DistributedType.DEEPSPEED
    assert (config.num_processes, config.num_machines, config.machine_rank) == (16, 2, 1)
    assert (config.main_process_ip, config.main_process_port) == ("10.0.0.1", 29555)
    ds = _validated_ds_config(tmp_path / render.DS_CONFIG_FILE, 16, monkeypatch)
    assert ds.train_batch_size == plan.per_device_batch_size * plan.gradient_accumulation_steps * 16


def test_deepspeed_config_needs_a_deepspeed_plan():
    with pytest.raises(ValueError):
        render.deepspeed_config(_fsdp())


def test_deepspeed_config_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    render.write_accelerate_config(_deepspeed(2), render.Rendezvous(), run_dir.relative_to(tmp_path))
    config = yaml.safe_load((run_dir / "accelerate.yaml").read_text(encoding="utf-8"))
    assert config["deepspeed_config"]["deepspeed_config_file"] == str(run_dir / "ds_config.json")


# --- Sharded engines on CPU processes (--engine fsdp|deepspeed without GPUs) -------------

def _cpu_plan(engine: str, processes: int = 2):
    return planner.plan(hardware.parse_spec("cpu"), models.resolve("tiny"),
                        planner.TrainSpec(method="qlora", engine=engine, processes_per_node=processes))


def test_fsdp_on_cpu_processes_renders_an_fsdp_config_accelerate_reads(tmp_path):
    plan = _cpu_plan("fsdp")
    assert (plan.engine, plan.num_processes, plan.on_cpu) == ("fsdp", 2, True)
    config = load_config_from_file(str(render.write_accelerate_config(
        plan, render.Rendezvous(), tmp_path)))
    assert config.distributed_type == DistributedType.FSDP and config.use_cpu
    # torch's FSDP refuses CPU tensors for the broadcast: every rank loads the weights.
    assert config.fsdp_config["fsdp_sync_module_states"] is False
    assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"] is False
    assert config.mixed_precision == "no"


def test_one_process_engines_are_the_engine_not_single():
    assert (_cpu_plan("fsdp", 1).engine, _cpu_plan("deepspeed", 1).zero_stage) == ("fsdp", 3)
    gpu = planner.plan(hardware.parse_spec("1xA100-80GB"), models.resolve("tiny"),
                       planner.TrainSpec(engine="fsdp"))
    assert (gpu.engine, gpu.num_processes) == ("fsdp", 1)
    assert planner.plan(hardware.parse_spec("cpu"), models.resolve("tiny"),
                        planner.TrainSpec(processes_per_node=2)).engine == "cpu"  # auto stays DDP


def test_deepspeed_buckets_fit_the_adapter_and_small_weights_are_partitioned():
    plan = _deepspeed(3)
    zero = render.deepspeed_config(plan, hidden_size=8192)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == \
        plan.trainable_parameters < 500_000_000
    assert zero["stage3_param_persistence_threshold"] == 81920
