"""Resume is honest: a changed setting takes effect on resume or is refused (exit 2, the
way out named, run.yaml left as it was); a run without a checkpoint takes new settings.

Every case starts from a copy of the session's tiny run (conftest.TINY_TRAIN: 12 steps,
logged every 2, checkpoint-6) with its adapter removed: a run stopped at checkpoint-6,
through the real console script.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import TINY_TRAIN, assert_user_error, run_ftlaunch, tree
from ftlaunch.run import resume_rules
from ftlaunch.errors import UserError


@pytest.fixture
def stopped(tiny_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run[1], run, symlinks=True)
    shutil.rmtree(run / "adapter")
    assert [p.name for p in (run / "checkpoints").glob("checkpoint-*")] == ["checkpoint-6"]
    return run


def _command(*changes: str, lr: str = "5e-3") -> list[str]:
    args = [a if a != "learning_rate=5e-3" else f"learning_rate={lr}" for a in TINY_TRAIN]
    return [*args, *changes]


def _lrs(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["learning_rate"] for row in rows if "learning_rate" in row}


def test_a_new_learning_rate_scales_the_schedule_from_the_checkpoint(tiny_run, stopped):
    """The Trainer restores the scheduler's peak with its state: without ftlaunch putting the
    new peak in place, the steps after the resume would log the old rates."""
    proc = run_ftlaunch(*_command("--output-dir", str(stopped), lr="2.5e-3"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ("learning rate changed from 0.005 to 0.0025: the schedule continues from step 6 "
            "with peak 0.0025") in proc.stdout
    uninterrupted, resumed = _lrs(tiny_run[1]), _lrs(stopped)
    assert sorted(resumed) == sorted(uninterrupted) == [2, 4, 6, 8, 10, 12]
    for step in (2, 4, 6):
        assert resumed[step] == uninterrupted[step]
    for step in (8, 10, 12):  # the same cosine, at half the peak
        assert resumed[step] == pytest.approx(uninterrupted[step] / 2, rel=1e-6), step
    record = yaml.safe_load((stopped / "run.yaml").read_text())
    assert record["recipe"]["training"]["learning_rate"] == 2.5e-3


@pytest.mark.parametrize("flags, key", [
    (("--system-prompt", "Answer in one word."), "system_prompt"),
    (("--no-packing",), "packing"),
])
def test_a_change_of_the_tokens_trained_is_refused_unless_allowed(stopped, flags, key):
    before = tree(stopped)
    refused = run_ftlaunch(*_command(*flags, "--dry-run", "--output-dir", str(stopped)))
    assert_user_error(refused, "holds a run made with different settings", f"{key}: was",
                      f"--set resume.allow_changed={key}")
    assert tree(stopped) == before
    allowed = run_ftlaunch(*_command(*flags, "--set", f"resume.allow_changed={key}",
                                     "--dry-run", "--output-dir", str(stopped)))
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert f"changed on purpose (resume.allow_changed): {key}: was" in allowed.stdout


def test_a_refused_training_setting_leaves_the_run_as_it_was(stopped):
    """The checkpoint's optimizer state would bring back the old weight decay: refused, not
    written into run.yaml, nothing launched."""
    run_yaml = (stopped / "run.yaml").read_bytes()
    checkpoint = tree(stopped / "checkpoints")
    proc = run_ftlaunch(*_command("--set", "weight_decay=0.1", "--output-dir", str(stopped)))
    assert_user_error(proc, "weight_decay (was 0.0, now 0.1", "--set weight_decay=0.0", "--fresh")
    assert (stopped / "run.yaml").read_bytes() == run_yaml
    assert tree(stopped / "checkpoints") == checkpoint
    assert not (stopped / "adapter").exists()


def test_a_run_without_a_checkpoint_takes_changed_lora_settings(stopped):
    """Nothing trained with the old settings survives, so nothing would be mixed: the new
    LoRA rank is used, said, and recorded."""
    shutil.rmtree(stopped / "checkpoints")
    proc = run_ftlaunch(*_command("--max-steps", "2", "--set", "lora.r=8",
                                  "--output-dir", str(stopped)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no checkpoint to resume from, so this starts over with the new settings: lora:" \
        in proc.stdout
    record = yaml.safe_load((stopped / "run.yaml").read_text())
    assert record["identity"]["lora"]["r"] == 8
    adapter = json.loads((stopped / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8
    assert sorted(_lrs(stopped)) == [2]  # the old run's logged steps are gone


def test_a_finished_run_still_refuses_a_changed_lora_shape(tiny_run, tmp_path):
    """A finished run has no checkpoint, but its adapter holds the old settings."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run[1], run, symlinks=True)
    before = tree(run)
    proc = run_ftlaunch(*_command("--set", "lora.r=8", "--dry-run", "--output-dir", str(run)))
    assert_user_error(proc, "lora: was", "cannot change in a resume")
    assert tree(run) == before


def test_the_table_says_each_change_or_refuses_it():
    before = {"learning_rate": 2e-4, "lr_scheduler_type": "cosine", "max_steps": 100,
              "logging_steps": 1, "optim": "adamw_torch", "weight_decay": 0.0}
    notes = resume_rules.notes(before, {**before, "learning_rate": 1e-4, "max_steps": 200,
                                          "logging_steps": 5}, step=40)
    assert notes == [
        "learning rate changed from 0.0002 to 0.0001: the schedule continues from step 40 "
        "with peak 0.0001",
        "logging_steps changed from 1 to 5: used from step 40 on",
        "max_steps changed from 100 to 200: the schedule now spans the new total, continuing "
        "from step 40"]
    with pytest.raises(UserError) as refused:
        resume_rules.notes(before, {**before, "optim": "sgd", "weight_decay": 0.1}, step=40)
    message = str(refused.value)
    assert "optim (was 'adamw_torch', now 'sgd'" in message and "weight_decay (was 0.0" in message
    assert "--set optim=adamw_torch --set weight_decay=0.0" in message and "--fresh" in message
    with pytest.raises(UserError, match="reduce_lr_on_plateau"):
        resume_rules.notes(before, {**before, "lr_scheduler_type": "reduce_lr_on_plateau"}, 40)


def test_a_rate_set_only_now_is_said_and_a_stateful_schedule_refuses_a_new_rate():
    # A recipe file without learning_rate, resumed with --set learning_rate=...
    assert resume_rules.notes({}, {"learning_rate": 1e-4}, step=10) == [
        "learning_rate changed from None to 0.0001: the schedule continues from step 10 with "
        "peak 0.0001"]
    plateau = {"learning_rate": 1e-3, "lr_scheduler_type": "reduce_lr_on_plateau"}
    with pytest.raises(UserError, match="keeps its own rates"):
        resume_rules.notes(plateau, {**plateau, "learning_rate": 1e-4}, step=10)


def test_a_changed_chat_template_is_refused_like_the_data(tiny_run, tmp_path):
    """The same model folder with an edited template trains other tokens."""
    _, finished = tiny_run
    record = yaml.safe_load((finished / "run.yaml").read_text())
    model = shutil.copytree(record["model"]["load_from"], tmp_path / "model")
    argv = ("--model", str(model), "--gpus", "1", "--max-steps", "2", "--global-batch-size", "4",
            "--seq-len", "64", "--output-dir", str(tmp_path / "run"))
    assert run_ftlaunch(*argv).returncode == 0
    template = model / "chat_template.jinja"
    template.write_text("{#- edited -#}\n" + template.read_text())
    before = tree(tmp_path / "run")
    assert_user_error(run_ftlaunch(*argv), "chat_template: was 'sha256:",
                      "resume.allow_changed=chat_template")
    assert tree(tmp_path / "run") == before
