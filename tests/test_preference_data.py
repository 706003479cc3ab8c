"""Preference pairs (DPO's data): detection, canonical rows, every bad row refused with its
file and line, and the launcher's tokenization against TRL's own: the ids DPOTrainer
builds from the same rows, and the loss masks its collator makes of them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from conftest import run_ftlaunch
from ftlaunch.data import preference
from ftlaunch.data import read as data
from ftlaunch.errors import UserError

USER = {"role": "user", "content": "What is 2 + 2?"}
GOOD = {"role": "assistant", "content": "2 + 2 = 4"}
BAD = {"role": "assistant", "content": "2 + 2 = 5"}
PLAIN = {"prompt": "Q: 2 + 2 =", "chosen": " 4", "rejected": " 5"}
CHAT = {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}
IMPLICIT = {"chosen": [USER, GOOD], "rejected": [USER, BAD]}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("row, fmt, kind", [
    (PLAIN, "preference", "preference"),
    (CHAT, "chat_preference", "chat_preference"),
    (IMPLICIT, "chat_preference", "chat_preference"),
])
def test_preference_formats_are_detected_and_the_prompt_made_explicit(tmp_path, row, fmt, kind):
    dataset = data.load(_jsonl(tmp_path / "pairs.jsonl", [row, row]))
    assert (dataset.format, dataset.kind) == (fmt, kind)
    expected = PLAIN if kind == "preference" else CHAT
    assert dataset.rows[0] == expected
    assert data.peek_kind(tmp_path / "pairs.jsonl") == kind


def test_a_system_prompt_goes_before_a_chat_pair_prompt(tmp_path):
    dataset = data.load(_jsonl(tmp_path / "pairs.jsonl", [IMPLICIT]), system_prompt="Be exact.")
    assert dataset.rows[0]["prompt"] == [{"role": "system", "content": "Be exact."}, USER]
    with pytest.raises(UserError, match="system prompts apply to chat data only"):
        data.load(_jsonl(tmp_path / "plain.jsonl", [PLAIN]), system_prompt="Be exact.")


@pytest.mark.parametrize("bad, needle", [
    ({"prompt": "Q", "chosen": " 4"}, "missing `rejected`"),
    ({"prompt": "Q", "chosen": " 4", "rejected": ""}, "`rejected` is empty"),
    ({"prompt": "Q", "chosen": " 4", "rejected": " 4"}, "`chosen` and `rejected` are the same"),
    ({"prompt": "Q", "chosen": 4, "rejected": " 5"}, "`chosen` must be a string"),
    ({"prompt": [USER, GOOD], "chosen": [GOOD], "rejected": [BAD]},
     "the prompt ends with an assistant turn"),
    ({"chosen": [USER, GOOD], "rejected": [{"role": "user", "content": "other"}, BAD]},
     "share no first turn"),
    ({"prompt": [USER], "chosen": [GOOD], "rejected": [USER]},
     "`rejected` must answer with a non-empty assistant turn"),
    ({"prompt": [USER], "chosen": [{"role": "assistant", "content": " "}], "rejected": [BAD]},
     "`chosen` must answer with a non-empty assistant turn"),
    ({"prompt": [USER], "chosen": [GOOD], "rejected": [{"role": "robot", "content": "x"}]},
     "`role` 'robot' is not one of"),
    ({"chosen": [USER, GOOD], "rejected": [USER, GOOD]}, "`chosen` and `rejected` are the same"),
    ({"chosen": [USER], "rejected": [USER, BAD]}, "`chosen` holds nothing after the prompt"),
])
def test_every_bad_pair_is_refused_with_its_file_and_line(tmp_path, bad, needle):
    good = PLAIN if isinstance(bad["chosen"], (str, int)) else CHAT
    path = _jsonl(tmp_path / "pairs.jsonl", [good, bad, good])
    with pytest.raises(UserError) as refused:
        data.load(path)
    assert f"{path}, line 2" in str(refused.value) and needle in str(refused.value)


def test_bad_pairs_end_the_launch_with_exit_2_and_nothing_written(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", [CHAT, {**CHAT, "rejected": CHAT["chosen"]}])
    run_dir = tmp_path / "run"
    proc = run_ftlaunch("--model", "tiny", "--data", str(path), "--output-dir", str(run_dir))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{path}, line 2 (format chat_preference)" in proc.stderr
    assert "Traceback" not in proc.stderr and not run_dir.exists()


def test_sft_data_with_objective_dpo_and_pairs_with_sft_are_refused(tmp_path):
    pairs = _jsonl(tmp_path / "pairs.jsonl", [PLAIN])
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": [USER, GOOD]}])
    for path, objective, needle in ((chat, "dpo", "--objective dpo trains on preference pairs"),
                                    (pairs, "sft", "which train with --objective dpo")):
        proc = run_ftlaunch("--model", "tiny", "--data", str(path), "--objective", objective,
                            "--output-dir", str(tmp_path / "run"), "--dry-run")
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    proc = run_ftlaunch("plan", "--model", "tiny", "--data", str(pairs), "--recipe", "demo")
    assert proc.returncode == 2 and "--recipe demo configures SFT" in proc.stderr, proc.stderr


@pytest.mark.parametrize("rows", [
    [PLAIN, {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}],
    [CHAT, {"prompt": [USER, GOOD, {"role": "user", "content": "And 3 + 3?"}],
            "chosen": [{"role": "assistant", "content": "6"}],
            "rejected": [{"role": "assistant", "content": "7"}]}],
    [IMPLICIT, {"chosen": [USER, GOOD, {"role": "user", "content": "And 3 + 3?"},
                           {"role": "assistant", "content": "6"}],
                "rejected": [USER, GOOD, {"role": "user", "content": "And 3 + 3?"},
                             {"role": "assistant", "content": "7"}]}],
], ids=["preference", "chat_preference", "implicit_prompt"])
def test_cached_pairs_are_the_ids_dpo_trainer_builds_and_its_masks_cover_the_answers(
        tmp_path, tiny_chat_tokenizer, rows):
    """TRL's own DPOTrainer._prepare_dataset on the canonical rows gives the same ids as
    the launcher's tokenization; DataCollatorForPreference's completion_mask then marks
    exactly the chosen / rejected answer (and the end of its turn), never the prompt."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    dataset = data.load(_jsonl(tmp_path / "pairs.jsonl", rows))
    batch = {key: [row[key] for row in dataset.rows] for key in dataset.rows[0]}
    ours = preference.tokenize_batch(batch, list(range(len(rows))), tiny_chat_tokenizer, dataset.kind)
    args = DPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, max_length=None,
                     report_to="none")
    # TRL gets the rows as the file has them: it extracts an implicit prompt itself.
    theirs = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tiny_chat_tokenizer),
                                         Dataset.from_list(rows), tiny_chat_tokenizer, args, "train")
    for name in preference.COLUMNS:
        assert ours[name] == theirs[name], name

    pairs = [dict(zip(preference.COLUMNS, values))
             for values in zip(*(ours[name] for name in preference.COLUMNS))]
    collated = DataCollatorForPreference(pad_token_id=tiny_chat_tokenizer.pad_token_id or 0)(pairs)
    n = len(pairs)
    for index, row in enumerate(dataset.rows):
        for half, name in ((0, "chosen"), (1, "rejected")):
            ids = collated["input_ids"][half * n + index]
            mask = collated["completion_mask"][half * n + index].bool()
            trained = tiny_chat_tokenizer.decode(ids[mask])
            answer = row[name] if isinstance(row[name], str) else row[name][0]["content"]
            assert trained.strip().startswith(answer.strip()), (trained, answer)
            prompt = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
            assert prompt not in trained
            # What `data preview` marks is what the collator trains.
            sequence, marks = preference.sequences(pairs[index])[name]
            assert [t for t, m in zip(sequence, marks) if m] == ids[mask].tolist()


def test_bundled_demo_pairs_are_what_the_generator_writes(tmp_path):
    """The demo's DPO step trains on them: new questions, the right answer chosen and a
    near miss rejected, every pair distinct."""
    from ftlaunch.data import demo
    from ftlaunch.resources import demo_data_path, demo_pairs_path

    written = tmp_path / "pairs.jsonl"
    demo.write(written, count=300, seed=1, pairs=True)
    assert written.read_bytes() == demo_pairs_path().read_bytes()
    pairs = data.load(demo_pairs_path())
    assert (pairs.format, len(pairs)) == ("chat_preference", 300)
    sft_questions = {row["messages"][-2]["content"] for row in data.load(demo_data_path()).rows}
    new = [row for row in pairs.rows if row["prompt"][-1]["content"] not in sft_questions]
    assert len(new) > 150  # more than half of them questions the SFT step never saw
