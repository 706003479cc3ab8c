"""The run record (run/record.py): what the launcher writes as run.yaml is what every
reader gets back, typed; old and damaged files are told apart."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from conftest import run_ftlaunch, write_run_record
from ftlaunch.errors import UserError
from ftlaunch.run import record as run_record


def test_a_launch_writes_a_record_that_reads_back_typed(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_ftlaunch("--model", "tiny", "--gpus", "2", "--eval-split", "0.25", "--dry-run",
                        "--output-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = run_record.load(run_dir)
    raw = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert raw["schema"] == run_record.SCHEMA == record.schema
    # Derived facts agree with the plan they come from.
    s, plan = record.strategy, raw["plan"]
    assert (s.engine, s.method, s.world_size) == (plan["engine"], plan["method"], 2)
    assert s.on_cpu and s.processes_per_node == 2 and s.nnodes == 1 and not s.node_local
    assert s.global_batch == s.per_device_batch_size * s.gradient_accumulation_steps * 2
    assert s.global_batch == plan["global_batch_size"] and s.checkpoint_format == "trainer"
    # The Trainer's arguments are the plan's split and the recipe's settings, resolved.
    assert record.trainer["per_device_train_batch_size"] == s.per_device_batch_size
    assert record.trainer["eval_strategy"] == "steps" and record.trainer["use_cpu"] is True
    assert record.trainer["seed"] == record.seed == raw["recipe"]["training"]["seed"]
    assert record.model.random_init is False and record.model.is_builtin  # a dry run builds nothing
    # In-job restarts: the budget of this launch, none done yet (the launcher adds each).
    assert record.restarts == run_record.Restarts(max=3, done=())
    # Written back, the same YAML: nothing is lost on the way through the types.
    assert record.to_json() == raw


def test_a_record_from_before_schema_1_loads_for_resume_and_export(tmp_path):
    write_run_record(tmp_path, {"seq_len": 64})
    raw = yaml.safe_load((tmp_path / "run.yaml").read_text())
    for key in ("schema", "strategy", "trainer", "restarts"):
        raw.pop(key, None)
    raw["plan"] = {"method": "qlora", "engine": "fsdp", "precision": "bf16", "zero_stage": None,
                   "offload": False, "num_processes": 8, "num_machines": 2,
                   "per_device_batch_size": 2, "gradient_accumulation_steps": 4,
                   "global_batch_size": 64, "seq_len": 512, "gradient_checkpointing": True,
                   "hardware": {"nodes": 2, "gpus_per_node": 4}}
    raw["recipe"] = {"training": {"seed": 7}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    record = run_record.load(tmp_path)
    assert record.schema == 0 and record.trainer is None and record.seed == 7
    assert record.strategy.processes_per_node == 4 and record.strategy.checkpoint_format == "fsdp"
    assert record.strategy.on_cpu is False and record.identity == {"seq_len": 64}
    assert record.restarts == run_record.Restarts(max=0, done=())  # written before restarts


@pytest.mark.parametrize("damage", ["missing", "not yaml", "no model", "newer schema"])
def test_a_damaged_record_is_a_user_error_naming_the_file(tmp_path, damage):
    write_run_record(tmp_path, {})
    path = tmp_path / "run.yaml"
    raw = yaml.safe_load(path.read_text())
    if damage == "missing":
        path.unlink()
    elif damage == "not yaml":
        path.write_text("identity: [unclosed\n")
    elif damage == "no model":
        del raw["model"]
        path.write_text(yaml.safe_dump(raw))
    else:
        raw["schema"] = run_record.SCHEMA + 1
        path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=str(path)) as refused:
        run_record.load(tmp_path)
    if damage == "newer schema":
        assert "upgrade ftlaunch" in str(refused.value)


def test_the_record_is_frozen(tmp_path):
    write_run_record(tmp_path, {})
    record = run_record.load(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.strategy.world_size = 3
