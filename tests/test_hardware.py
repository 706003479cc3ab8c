"""Hardware specs (`--hardware`) and detection of this machine."""

import shutil

import pytest

from ftlaunch.detect import hardware
from ftlaunch.units import GIB
from ftlaunch.errors import UserError


def test_cpu_spec_has_no_gpus():
    hw = hardware.parse_spec("cpu")
    assert hw.has_gpus is False
    assert hw.gpu is None
    assert hw.gpus_per_node == 0
    assert hw.nodes == 1
    assert hw.cpu_cores >= 1
    assert hw.ram_bytes > 0
    assert hw.source == "cpu"
    assert hardware.parse_spec("CPU").has_gpus is False


def test_single_consumer_gpu():
    hw = hardware.parse_spec("1xRTX4090-24GB")
    assert hw.has_gpus
    assert (hw.nodes, hw.gpus_per_node) == (1, 1)
    assert hw.gpu.name == "RTX4090"
    assert hw.gpu.memory_bytes == 24 * GIB
    assert hw.gpu.compute_capability == (8, 9)
    assert hw.gpu.bf16 is True


def test_eight_h100():
    hw = hardware.parse_spec("8xH100-80GB")
    assert (hw.nodes, hw.gpus_per_node) == (1, 8)
    assert hw.gpu.name == "H100"
    assert hw.gpu.memory_bytes == 80 * GIB
    assert hw.gpu.bf16 is True
    assert hw.source == "8xH100-80GB"


def test_nodes_times_gpus():
    hw = hardware.parse_spec("2x8xA100-80GB")
    assert hw.nodes == 2
    assert hw.gpus_per_node == 8
    assert hw.gpu.name == "A100"
    assert hw.gpu.memory_bytes == 80 * GIB
    assert hw.gpu.compute_capability == (8, 0)


def test_lower_case_spec_is_the_same_hardware():
    lower = hardware.parse_spec("8xh100-80gb")
    upper = hardware.parse_spec("8xH100-80GB")
    assert lower.gpu == upper.gpu
    assert (lower.nodes, lower.gpus_per_node) == (upper.nodes, upper.gpus_per_node)
    assert lower.gpu.name == "H100"
    assert lower.gpu.compute_capability == (9, 0)


@pytest.mark.parametrize("spec", ["1xV100-32GB", "4xT4-16GB", "2xv100-16GB"])
def test_pre_ampere_gpus_have_no_bf16(spec):
    hw = hardware.parse_spec(spec)
    assert hw.gpu.compute_capability is not None
    assert hw.gpu.compute_capability < (8, 0)
    assert hw.gpu.bf16 is False
    assert hw.to_json()["bf16"] is False


def test_to_json_names_the_gpu():
    data = hardware.parse_spec("2x8xA100-80GB").to_json()
    assert data["nodes"] == 2
    assert data["gpus_per_node"] == 8
    assert data["gpu_name"] == "A100"
    assert data["gpu_memory_bytes"] == 80 * GIB
    assert data["bf16"] is True


@pytest.mark.parametrize("spec", [
    "8xH100",          # no memory
    "0xA100-80GB",     # no GPUs
    "0x8xA100-80GB",   # no nodes
    "banana",
    "",
    "H100-80GB",       # no count
    "8xH100-80",       # no unit
    "-1xA100-80GB",
])
def test_bad_specs_are_user_errors(spec):
    with pytest.raises(UserError) as info:
        hardware.parse_spec(spec)
    assert "--hardware" in str(info.value)


def test_detect_with_cuda_hidden_sees_no_gpus(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    hw = hardware.detect(tmp_path)
    assert hw.has_gpus is False
    assert hw.cpu_cores >= 1
    assert hw.disk_free_bytes is not None and hw.disk_free_bytes > 0
    assert hw.source == "detected"


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None,
                    reason="this check is for a machine without nvidia-smi")
def test_detect_on_this_machine_without_gpus():
    hw = hardware.detect()
    assert hw.has_gpus is False
    assert hw.gpu is None
    assert hw.cpu_cores >= 1
    assert hw.ram_bytes > 0
    assert hw.disk_free_bytes is None  # no output dir given, no disk probe
