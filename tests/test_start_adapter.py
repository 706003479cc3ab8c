"""`--adapter RUN_DIR|PATH`: which folders start a run, what each refusal says (exit 2,
nothing written), the adapter's LoRA settings replacing the recipe's, and the run's own
copy standing in when the folder it came from is gone."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_ftlaunch
from ftlaunch.errors import UserError
from ftlaunch.models import adapter as adapters
from ftlaunch.plan import job as job_mod

CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none",
          "base_model_name_or_path": "/somewhere/else/models/tiny-5d76d51906a6",
          "target_modules": ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]}


def _adapter(folder, **config):
    folder.mkdir(parents=True)
    (folder / adapters.CONFIG).write_text(json.dumps({**CONFIG, **config}))
    (folder / adapters.WEIGHTS).write_bytes(b"weights")
    return folder


def test_a_run_directory_or_an_adapter_folder_starts_a_run(tmp_path):
    run = tmp_path / "run"
    _adapter(run / "adapter")
    (run / "run.yaml").write_text("schema: 1\n")
    for given, folder in ((run, run / "adapter"), (run / "adapter", run / "adapter")):
        start = adapters.resolve(str(given))
        assert start.folder == folder.resolve() and start.fingerprint.startswith("sha256:")
    assert start.lora_settings() == {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                                     "bias": "none", "target_modules": ["down_proj", "q_proj"]}
    # The same base at another path (another machine's cache) is the same model.
    adapters.check_base(start, ("tiny", "builtin:tiny", "/root/.cache/models/tiny-5d76d51906a6"))
    with pytest.raises(UserError, match="was trained on /somewhere/else"):
        adapters.check_base(start, ("smollm2-135m", "x", "/cache/smollm2-135m-gguf-b9c3"))


@pytest.mark.parametrize("layout, needle", [
    ("missing", "no such folder"),
    ("unfinished run", "this run has no finished adapter"),
    ("not an adapter", "not a LoRA adapter folder"),
    ("prefix tuning", "is not a LoRA adapter's config \\(peft_type 'PREFIX_TUNING'\\)"),
])
def test_what_is_not_an_adapter_is_refused(tmp_path, layout, needle):
    given = tmp_path / "given"
    if layout == "unfinished run":
        given.mkdir()
        (given / "run.yaml").write_text("schema: 1\n")
    elif layout == "not an adapter":
        given.mkdir()
    elif layout == "prefix tuning":
        _adapter(given, peft_type="PREFIX_TUNING")
    with pytest.raises(UserError, match=needle):
        adapters.resolve(str(given))


def test_a_run_goes_on_from_its_copy_whatever_became_of_the_folder(tmp_path):
    """The run's start-adapter/ is what it started from: a resume uses it when the
    folder is gone or was trained further (and says so); --fresh starts from the folder."""
    source = _adapter(tmp_path / "sft" / "adapter")
    run_dir = tmp_path / "run"
    copy = _adapter(run_dir / adapters.START_FOLDER)

    def resolved(**options):
        return job_mod.resolve(job_mod.Options(model="tiny", adapter=str(source),
                                               output_dir=str(run_dir), **options),
                               validate=False).start_adapter

    assert resolved().folder == copy.resolve() and resolved().note is None
    (source / adapters.WEIGHTS).write_bytes(b"trained further")
    assert "changed since this run started from it" in resolved().note
    assert resolved(fresh=True).folder == source.resolve()
    shutil.rmtree(source)
    started = resolved()
    assert started.folder == copy.resolve() and "is gone or incomplete" in started.note
    with pytest.raises(UserError, match="no such folder"):
        resolved(fresh=True)


def test_the_adapter_fixes_the_lora_settings_of_the_plan(tmp_path):
    folder = _adapter(tmp_path / "adapter")
    job = job_mod.resolve(job_mod.Options(model="tiny", adapter=str(folder),
                                          output_dir=str(tmp_path / "run")), validate=False)
    assert job.recipe.lora["r"] == 8 and job.spec.lora_rank == 8
    assert job.spec.lora_targets == ("down_proj", "q_proj")
    with pytest.raises(UserError, match="fixes the LoRA settings"):
        job_mod.resolve(job_mod.Options(model="tiny", adapter=str(folder),
                                        sets=("lora.r=32",)), validate=False)


def test_an_adapter_of_another_base_ends_the_launch_with_exit_2(tmp_path):
    folder = _adapter(tmp_path / "adapter", base_model_name_or_path="org/another-model")
    run_dir = tmp_path / "run"
    proc = run_ftlaunch("--model", "tiny", "--adapter", str(folder), "--dry-run",
                        "--output-dir", str(run_dir))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "was trained on org/another-model" in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists()
