"""Complete-or-nothing checkpoints and the resume gate: pure file and plan logic, no torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftlaunch.run import checkpoints
from ftlaunch.detect import hardware
from ftlaunch.plan import job as job_mod
from ftlaunch.models import presets as models
from ftlaunch.plan import planner
from ftlaunch.plan import recipe as recipes
from ftlaunch.run import resume_rules
from ftlaunch.run import directory as rundir
from ftlaunch.errors import UserError

from conftest import write_run_record


def _staged(root: Path, step: int, payload: bytes = b"weights") -> Path:
    staging = root / checkpoints.INCOMING / f"checkpoint-{step}"
    (staging / "sub").mkdir(parents=True)
    (staging / "adapter_model.safetensors").write_bytes(payload)
    (staging / "sub" / "shard.bin").write_bytes(payload * 3)
    return staging


def _complete(root: Path, step: int, **manifest) -> Path:
    return checkpoints.finalize(_staged(root, step), root, {"world_size": 1, **manifest})


def test_finalize_moves_a_checkpoint_in_with_a_manifest_of_every_file(tmp_path):
    path = _complete(tmp_path, 5, reason="steps")
    assert path == tmp_path / "checkpoint-5" and not (tmp_path / ".incoming" / "checkpoint-5").exists()
    manifest = json.loads((path / checkpoints.MARKER).read_text())
    assert manifest["step"] == 5 and manifest["reason"] == "steps"
    assert manifest["files"]["sub/shard.bin"]["bytes"] == 21
    assert checkpoints.verify(path) == (None, manifest)


@pytest.mark.parametrize("damage, why", [
    (lambda p: (p / checkpoints.MARKER).unlink(), "it has no completion marker"),
    (lambda p: (p / checkpoints.MARKER).write_text("{"), "its completion marker cannot be read"),
    (lambda p: (p / "sub" / "shard.bin").unlink(), "sub/shard.bin is missing"),
    (lambda p: (p / "sub" / "shard.bin").write_bytes(b"w"), "sub/shard.bin has 1 bytes, 21 were written"),
    (lambda p: (p / "adapter_model.safetensors").write_bytes(b"WEIGHTS"),
     "adapter_model.safetensors does not match its checksum"),
])
def test_a_damaged_checkpoint_does_not_count(tmp_path, damage, why):
    path = _complete(tmp_path, 5)
    damage(path)
    assert checkpoints.verify(path)[0] == why
    found = checkpoints.scan(tmp_path)
    assert found.newest is None and found.torn == [(path, why)]


def test_scan_prefers_the_newest_complete_and_reports_the_rest(tmp_path):
    _complete(tmp_path, 3)
    _complete(tmp_path, 6)
    _staged(tmp_path, 9)  # killed while writing
    torn = tmp_path / "checkpoint-12"
    torn.mkdir()  # a directory without a marker, e.g. written by another tool
    found = checkpoints.scan(tmp_path)
    assert [c.step for c in found.complete] == [3, 6] and found.newest.step == 6
    assert [(p.name, why) for p, why in found.torn] == [
        ("checkpoint-9", "it was being written when the run stopped"),
        ("checkpoint-12", "it has no completion marker")]


def test_retention_keeps_the_newest_k_and_deletes_only_complete_ones(tmp_path):
    for step in (2, 4, 6):
        _complete(tmp_path, step)
    unmarked = tmp_path / "checkpoint-1"
    unmarked.mkdir()  # torn: retention never deletes what it cannot vouch for
    assert [p.name for p in checkpoints.retain(tmp_path, 2)] == ["checkpoint-2"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-1", "checkpoint-4", "checkpoint-6"]
    assert checkpoints.retain(tmp_path, None) == []


def test_retention_finishes_a_delete_a_kill_interrupted(tmp_path):
    _complete(tmp_path, 2)
    (tmp_path / ".deleting-checkpoint-1").mkdir()
    checkpoints.retain(tmp_path, 2)
    assert not (tmp_path / ".deleting-checkpoint-1").exists()


def test_a_torn_leftover_of_the_same_step_is_set_aside_not_overwritten(tmp_path):
    leftover = tmp_path / "checkpoint-4"
    leftover.mkdir()
    (leftover / "old").write_text("x")
    path = _complete(tmp_path, 4)
    assert checkpoints.verify(path)[0] is None
    (kept,) = (tmp_path / checkpoints.SET_ASIDE).iterdir()
    assert (kept / "old").read_text() == "x"


def _plan(processes: int, global_batch: int = 4, engine: str = "auto", gpus: str = "cpu"):
    machine = hardware.parse_spec(gpus)
    spec = planner.TrainSpec(seq_len=64, global_batch_size=global_batch, method="lora",
                             engine=engine, processes_per_node=processes)
    return planner.plan(machine, models.resolve("tiny"), spec)


def _checkpoint(tmp_path, **manifest) -> checkpoints.Checkpoint:
    base = {"format": "trainer", "engine": "cpu", "world_size": 2, "global_batch_size": 4,
            "per_device_batch_size": 2, "gradient_accumulation_steps": 1, "samples_seen": 24}
    return checkpoints.Checkpoint(6, tmp_path / "checkpoint-6", {**base, **manifest})


def _recipe(max_steps: int = 12):
    recipe = recipes.load_recipe("default")
    return recipes.apply_overrides(recipe, [f"max_steps={max_steps}"])


def test_resume_on_another_process_count_says_what_changed(tmp_path):
    notes = resume_rules.check_resume(_checkpoint(tmp_path), _plan(1), _recipe(), ())
    assert notes == ["checkpoint-6 was written by 2 processes (micro-batch 2 x accumulation 1); "
                     "resuming on 1 (micro-batch 4 x accumulation 1), global batch 4, 24 samples "
                     "seen so far"]
    assert resume_rules.check_resume(_checkpoint(tmp_path), _plan(2), _recipe(), ()) == []


def test_resume_with_another_global_batch_is_refused_unless_allowed(tmp_path):
    with pytest.raises(UserError, match="global batch of 4 .* this plan's is 8"):
        resume_rules.check_resume(_checkpoint(tmp_path), _plan(2, global_batch=8), _recipe(), ())
    assert resume_rules.check_resume(_checkpoint(tmp_path, world_size=2), _plan(2, global_batch=8),
                              _recipe(), ("global_batch",)) == []


def test_zero_partitions_cannot_change_process_count(tmp_path):
    plan = _plan(4, engine="deepspeed", gpus="1x4xA100-80GB")
    shards = _checkpoint(tmp_path, format="deepspeed", engine="deepspeed", world_size=8,
                         global_batch_size=plan.global_batch_size)
    with pytest.raises(UserError, match="ZeRO partitions for 8 processes.*--gpus 8"):
        resume_rules.check_resume(shards, plan, _recipe(), ())


def test_fsdp_checkpoints_reshard_to_another_process_count(tmp_path):
    """torch's distributed checkpoints reshard on load: a note, not a refusal."""
    plan = _plan(4, engine="fsdp", gpus="1x4xA100-80GB")
    shards = _checkpoint(tmp_path, format="fsdp", engine="fsdp", world_size=8,
                         global_batch_size=plan.global_batch_size)
    notes = resume_rules.check_resume(shards, plan, _recipe(), ())
    assert any("was written by 8 processes" in note and "resuming on 4" in note
               for note in notes)


def test_a_checkpoint_of_another_engine_family_is_refused(tmp_path):
    plan = _plan(4, engine="deepspeed", gpus="1x4xA100-80GB")
    with pytest.raises(UserError, match="written by a cpu run; this plan trains with deepspeed"):
        resume_rules.check_resume(_checkpoint(tmp_path), plan, _recipe(), ())


def test_a_checkpoint_past_max_steps_is_refused(tmp_path):
    with pytest.raises(UserError, match="not before --max-steps 6"):
        resume_rules.check_resume(_checkpoint(tmp_path), _plan(2), _recipe(max_steps=6), ())


def test_identity_changes_are_refused_by_name_unless_allowed(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    identity = {"model": "tiny", "seq_len": 64, "data": "sha256:a"}
    write_run_record(run_dir, identity)
    _complete(run_dir / "checkpoints", 6)
    changed = {**identity, "seq_len": 96, "data": "sha256:b"}
    with pytest.raises(UserError) as refused:
        rundir.prepare(run_dir, changed, fresh=False)
    assert "data: was 'sha256:a', now 'sha256:b'" in str(refused.value)
    assert "resume.allow_changed=data,seq_len" in str(refused.value)
    state = rundir.prepare(run_dir, changed, fresh=False, allow_changed=("data", "seq_len"))
    assert state.kind == "resume" and len(state.allowed_changes) == 2


def test_without_a_checkpoint_any_change_starts_the_run_over(tmp_path):
    """Nothing trained with the old settings survives: the LoRA shape may change too."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_run_record(run_dir, {"lora": {"r": 16}, "seq_len": 64})
    _staged(run_dir / "checkpoints", 6)  # torn: it does not count
    state = rundir.prepare(run_dir, {"lora": {"r": 8}, "seq_len": 64}, fresh=False)
    assert state.kind == "new" and state.checkpoint is None
    assert state.restarted_with == ("lora: was {'r': 16}, now {'r': 8}",)
    assert [path.name for path, _ in state.torn] == ["checkpoint-6"]


def test_allow_changed_is_parsed_out_of_the_recipe_overrides():
    options = job_mod.Options(model="tiny", sets=("learning_rate=1e-4",
                                                  "resume.allow_changed=[data, seq_len]"))
    parsed = job_mod.resolve(options, detect_output_dir=False).options
    assert parsed.sets == ("learning_rate=1e-4",) and parsed.allow_changed == ("data", "seq_len")


def test_a_changed_lora_shape_cannot_be_allowed(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_run_record(run_dir, {"lora": {"r": 16}, "seq_len": 64})
    _complete(run_dir / "checkpoints", 6)
    with pytest.raises(UserError) as refused:
        rundir.prepare(run_dir, {"lora": {"r": 8}, "seq_len": 96}, fresh=False)
    message = str(refused.value)
    assert "resume.allow_changed=seq_len;" not in message
    assert "resume.allow_changed=seq_len (lora cannot change in a resume" in message
