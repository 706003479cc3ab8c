"""ftlaunch doctor's checks, run for real on this machine (the console command is wired
separately, so the module is tested directly)."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from ftlaunch import doctor
from ftlaunch.hardware import GIB

NAMES = ("python", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "cuda",
         "bf16", "bitsandbytes", "deepspeed", "nccl", "flash-attn", "disk", "ram", "hf-hub")


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    return doctor.run_checks(tmp_path_factory.mktemp("doctor") / "run")


def by_name(checks) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


def test_every_check_runs_here_and_ftlaunch_can_train(checks):
    assert [c.name for c in checks] == list(NAMES) == list(doctor.CHECK_NAMES)
    for c in checks:
        assert c.status in ("ok", "warn", "missing"), c
        assert c.detail, c
        assert (c.fix == "") == (c.status == "ok"), c
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


def test_versions_are_the_installed_ones(checks):
    from importlib import metadata

    found = by_name(checks)
    for name in doctor.CORE_PACKAGES:
        assert found[name].detail.startswith(metadata.version(name)), found[name]


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
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
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


def test_disk_check_names_the_free_space(tmp_path):
    before = shutil.disk_usage(tmp_path).free
    disk = by_name(doctor.run_checks(tmp_path / "not" / "yet"))["disk"]
    after = shutil.disk_usage(tmp_path).free
    shown = float(re.search(r"([\d.]+) GiB free at ", disk.detail)[1])
    assert str(tmp_path.resolve()) in disk.detail  # the nearest existing folder
    # Printed to 0.1 GiB; other writers may move it between the measurements.
    assert min(before, after) / GIB - 0.05 <= shown <= max(before, after) / GIB + 0.05
    if abs(shown - doctor.DISK_WARN_BYTES / GIB) > 0.1:
        assert disk.status == ("ok" if shown > doctor.DISK_WARN_BYTES / GIB else "warn")


def test_check_refuses_inconsistent_fields():
    with pytest.raises(ValueError):
        doctor.Check("x", "fine", "detail")
    with pytest.raises(ValueError):
        doctor.Check("x", "warn", "detail", fix="")
    with pytest.raises(ValueError):
        doctor.Check("x", "ok", "detail", fix="do something")
