"""ftlaunch doctor's checks, run for real on this machine: the module directly, and the
console command once for its exit code."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess

import pytest
from huggingface_hub import constants as hub_constants

from conftest import FTLAUNCH
from ftlaunch.show import doctor, doctor_checks
from ftlaunch.units import GIB

NAMES = ("python", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "cuda",
         "bf16", "bitsandbytes", "deepspeed", "nccl", "flash-attn", "disk", "ram", "hf-hub")


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    return doctor.run_checks(tmp_path_factory.mktemp("doctor") / "run")


def by_name(checks) -> dict[str, doctor_checks.Check]:
    return {c.name: c for c in checks}


def test_every_check_runs_here_and_ftlaunch_can_train(checks):
    assert [c.name for c in checks] == list(NAMES)
    for c in checks:
        assert c.detail, c
    # The venv has every core package, and tmp_path is writable.
    assert [c for c in checks if c.status == "missing"] == []
    assert doctor.exit_code(checks) == 0
    text = doctor.render(checks)
    lines = text.splitlines()
    assert lines[0] == "ftlaunch doctor"
    for name in NAMES:
        assert re.search(rf"^  (ok|warn|missing) +{re.escape(name)} ", text, re.M), name
    assert re.fullmatch(r"Ready to train on (CPU|GPU)( \(\d+ warnings?\))?\.", lines[-1])
    assert all(len(line) <= 100 for line in lines), [line for line in lines if len(line) > 100]


def test_versions_are_the_imported_ones(checks):
    found = by_name(checks)
    for name in doctor.CORE_PACKAGES:
        version = importlib.import_module(name).__version__
        assert found[name].detail.startswith(version), found[name]


@pytest.mark.parametrize("version, status, says", [
    ("1.5.0", "ok", "1.5.0 (pinned 1.5.0)"),
    ("1.5.0+cu128", "ok", "1.5.0+cu128 (pinned 1.5.0)"),  # a local label is the build
    ("1.6.1", "warn", "1.6.1, but constraints.txt pins 1.5.0"),
    ("0.9.2", "missing", "0.9.2 installed; ftlaunch needs widget>=1.2,<2"),
    ("2.0.0", "missing", "2.0.0 installed; ftlaunch needs widget>=1.2,<2"),
    ("2.0.0rc1", "missing", "2.0.0rc1 installed; ftlaunch needs widget>=1.2,<2"),
])
def test_a_package_is_judged_by_the_range_then_the_pin(version, status, says):
    check = doctor_checks.version_check("widget", version, {"widget": "1.5.0"},
                                        {"widget": ">=1.2,<2"}, "missing")
    assert (check.status, check.detail) == (status, says), check
    if status == "missing":
        assert check.fix == "pip install 'widget==1.5.0'.", check
    elif status == "warn":
        assert check.fix.startswith("pip install 'widget==1.5.0' to match the tested set"), check


def test_an_unpinned_package_is_judged_by_the_range_alone():
    needs = {"widget": ">=1.2"}
    assert doctor_checks.version_check("widget", "3.0", {}, needs, "warn").status == "ok"
    outside = doctor_checks.version_check("widget", "1.0", {}, needs, "warn")
    assert outside.status == "warn" and outside.fix == "pip install 'widget>=1.2'.", outside


def test_cuda_check_matches_torch(checks):
    import torch

    found = by_name(checks)
    assert (found["cuda"].status == "ok") == torch.cuda.is_available()
    assert (found["bf16"].status == "warn") == (not torch.cuda.is_available()
                                                or not torch.cuda.is_bf16_supported(False))
    assert doctor.verdict(checks).startswith(
        "Ready to train on GPU" if torch.cuda.is_available() else "Ready to train on CPU")


def test_the_token_is_never_shown(monkeypatch, tmp_path):
    secret = "hf_doctorSECRETtoken0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", secret)
    checks = doctor.run_checks(tmp_path)
    text = doctor.render(checks)
    assert secret not in text
    for c in checks:
        assert all(secret not in field for field in (c.name, c.status, c.detail, c.fix)), c
    hub = by_name(checks)["hf-hub"].detail
    assert "token: set (HF_TOKEN, HUGGING_FACE_HUB_TOKEN)" in hub


def test_token_not_set_is_said(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    # huggingface_hub reads HF_TOKEN_PATH and HF_HUB_OFFLINE once, when it is imported.
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    hub = by_name(doctor.run_checks(tmp_path))["hf-hub"]
    assert hub.status == "ok"
    assert "token: not set" in hub.detail and "offline" in hub.detail


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_unwritable_output_dir_is_missing(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        checks = doctor.run_checks(locked / "run")
    finally:
        locked.chmod(0o700)
    disk = by_name(checks)["disk"]
    assert disk.status == "missing" and disk.fix, disk
    assert str(locked) in disk.detail
    assert doctor.exit_code(checks) == 1
    assert doctor.render(checks).splitlines()[-1] == "Not ready: 1 essential check failed (disk)."


def test_output_dir_that_is_a_file_is_missing(tmp_path):
    file = tmp_path / "a-file"
    file.write_text("")
    checks = doctor.run_checks(file / "run")
    assert by_name(checks)["disk"].status == "missing"
    assert doctor.exit_code(checks) == 1


def test_the_console_command_fails_on_an_output_dir_under_a_file(tmp_path):
    file = tmp_path / "a-file"
    file.write_text("")
    result = subprocess.run([FTLAUNCH, "doctor", "--output-dir", str(file / "run")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"^  missing  disk ", result.stdout, re.M), result.stdout
    assert f"{file} is a file" in " ".join(result.stdout.split()), result.stdout
    assert result.stdout.rstrip().splitlines()[-1] == "Not ready: 1 essential check failed (disk)."


def test_disk_check_names_the_free_space(tmp_path):
    before = shutil.disk_usage(tmp_path).free
    disk = by_name(doctor.run_checks(tmp_path / "not" / "yet"))["disk"]
    after = shutil.disk_usage(tmp_path).free
    shown = float(re.search(r"([\d.]+) GiB free at ", disk.detail)[1])
    assert str(tmp_path.resolve()) in disk.detail  # the nearest existing folder
    # Printed to 0.1 GiB; other writers may move it between the measurements.
    assert min(before, after) / GIB - 0.05 <= shown <= max(before, after) / GIB + 0.05
    if abs(shown - doctor_checks.DISK_WARN_BYTES / GIB) > 0.1:
        assert disk.status == ("ok" if shown > doctor_checks.DISK_WARN_BYTES / GIB else "warn")


def test_check_refuses_inconsistent_fields():
    with pytest.raises(ValueError):
        doctor_checks.Check("x", "fine", "detail")
    with pytest.raises(ValueError):
        doctor_checks.Check("x", "warn", "detail", fix="")
    with pytest.raises(ValueError):
        doctor_checks.Check("x", "ok", "detail", fix="do something")
