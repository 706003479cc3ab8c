"""--gpus 2 on a CPU machine: real 2-process DDP over gloo through accelerate launch."""

from __future__ import annotations

import json

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from conftest import run_ftlaunch

pytestmark = pytest.mark.slow


def test_two_cpu_processes_train_one_synchronised_adapter(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_ftlaunch("--model", "tiny", "--gpus", "2", "--max-steps", "6",
                        "--global-batch-size", "8", "--seq-len", "128",
                        "--set", "logging_steps=2", "--output-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    config = load_config_from_file(str(run_dir / "accelerate.yaml"))
    assert config.num_processes == 2 and config.use_cpu
    assert str(config.distributed_type) in ("MULTI_GPU", "DistributedType.MULTI_GPU")

    ranks = [json.loads((run_dir / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in ranks)
    assert ranks[0]["pid"] != ranks[1]["pid"]
    assert all(r["global_step"] == 6 for r in ranks)
    # Each rank trained on its own shard of the data...
    assert ranks[0]["data_digest"] != ranks[1]["data_digest"]
    # ...and still ended with bit-identical adapters: the gradients were all-reduced.
    assert ranks[0]["adapter_checksum"] == ranks[1]["adapter_checksum"]

    plan = yaml.safe_load((run_dir / "run.yaml").read_text())["plan"]
    assert plan["num_processes"] == 2
    assert plan["per_device_batch_size"] * plan["gradient_accumulation_steps"] * 2 == 8
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
