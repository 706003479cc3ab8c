"""Plan -> accelerate.yaml, read back with accelerate's own config loader."""

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from ftlaunch import hardware, models, planner, render
from ftlaunch.errors import UserError

MULTI_NODE = render.Rendezvous(machine_rank=1, main_process_ip="10.0.0.1",
                               main_process_port=29555)

CASES = {
    # id: (hardware spec, processes per node, rendezvous, expected engine)
    "cpu-1": ("cpu", None, render.Rendezvous(), "cpu"),
    "cpu-2": ("cpu", 2, render.Rendezvous(main_process_port=29601), "cpu"),
    "a100-single": ("1xA100-80GB", None, render.Rendezvous(), "single"),
    "a100x4-ddp": ("4xA100-80GB", None, render.Rendezvous(main_process_port=29602), "ddp"),
    "2x8xa100-ddp": ("2x8xA100-80GB", None, MULTI_NODE, "ddp"),
}


def _plan(spec, processes):
    return planner.plan(hardware.parse_spec(spec), models.resolve("tiny"),
                        planner.TrainSpec(processes=processes))


@pytest.mark.parametrize("case", list(CASES))
def test_accelerate_reads_the_rendered_config(case, tmp_path):
    spec, processes, rendezvous, engine = CASES[case]
    plan = _plan(spec, processes)
    assert plan.engine == engine
    path = render.write_accelerate_config(plan, rendezvous, tmp_path)
    assert path == tmp_path / "accelerate.yaml"
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary behind

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


def test_cpu_counts():
    assert _plan("cpu", None).num_processes == 1
    assert _plan("cpu", 2).num_processes == 2


def test_multi_node_rendezvous(tmp_path):
    plan = _plan("2x8xA100-80GB", None)
    config = load_config_from_file(str(render.write_accelerate_config(plan, MULTI_NODE, tmp_path)))
    assert config.num_processes == 16
    assert config.num_machines == 2
    assert config.machine_rank == 1
    assert config.main_process_ip == "10.0.0.1"
    assert config.main_process_port == 29555


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


def test_unlaunchable_engine_is_a_user_error():
    plan = planner.plan(hardware.parse_spec("4xA100-80GB"), models.resolve("llama-3.1-70b"),
                        planner.TrainSpec(method="lora", engine="fsdp"))
    assert plan.engine == "fsdp"
    with pytest.raises(UserError):
        render.template_name(plan)
