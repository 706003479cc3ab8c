"""KTO's data: completions labelled desirable or not, detected and checked row by row like
the other formats, preference pairs unpaired for it, and the launcher's tokenization and
the worker's last steps against TRL's own KTOTrainer: the same ids, labels and KL
completions, and the loss masks its collator makes of them. With the planner's side:
a device's micro-batch holds at least two examples (the KL estimate needs a neighbour)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from conftest import run_ftlaunch
from ftlaunch.data import preference
from ftlaunch.data import read as data
from ftlaunch.detect import hardware
from ftlaunch.errors import UserError
from ftlaunch.models import presets
from ftlaunch.plan import batch, planner
from ftlaunch.plan.planner import TrainSpec

USER = {"role": "user", "content": "What is 2 + 2?"}
GOOD = {"role": "assistant", "content": "2 + 2 = 4"}
BAD = {"role": "assistant", "content": "2 + 2 = 5"}
PLAIN = {"prompt": "Q: 2 + 2 =", "completion": " 4", "label": True}
CHAT = {"prompt": [USER], "completion": [BAD], "label": False}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("row, kind", [(PLAIN, "unpaired"), (CHAT, "chat_unpaired")])
def test_labelled_completions_are_detected_as_kto_data(tmp_path, row, kind):
    path = _jsonl(tmp_path / "data.jsonl", [row, row])
    dataset = data.load(path)
    assert (dataset.format, dataset.kind, dataset.rows[0]) == (kind, kind, row)
    assert data.peek_kind(path) == kind


def test_csv_labels_and_chat_cells_are_read(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('prompt,completion,label\n"Q: 1 + 1 =", 2,true\n"Q: 1 + 2 =", 4,FALSE\n',
                    encoding="utf-8")
    assert [row["label"] for row in data.load(path).rows] == [True, False]
    # Message lists as JSON text in their cells: chat data, not strings.
    chat = tmp_path / "chat.csv"
    cell = lambda turns: '"' + json.dumps(turns).replace('"', '""') + '"'  # noqa: E731
    chat.write_text(f"prompt,completion,label\n{cell([USER])},{cell([GOOD])},true\n",
                    encoding="utf-8")
    dataset = data.load(chat)
    assert dataset.kind == "chat_unpaired"
    assert dataset.rows == ({"prompt": [USER], "completion": [GOOD], "label": True},)


@pytest.mark.parametrize("bad, needle", [
    ({"prompt": "Q", "completion": " 4", "label": "yes"}, "`label` must be true"),
    ({"prompt": "Q", "completion": " 4", "label": 1}, "`label` must be true"),
    ({"prompt": "Q", "completion": " 4", "label": None}, "missing `label`"),
    ({"prompt": "Q", "completion": "", "label": True}, "`completion` is empty"),
    ({"prompt": [USER, GOOD], "completion": [GOOD], "label": True},
     "the prompt ends with an assistant turn"),
    ({"prompt": [USER], "completion": [USER], "label": True},
     "`completion` must answer with a non-empty assistant turn"),
])
def test_every_bad_labelled_completion_is_refused_with_its_file_and_line(tmp_path, bad, needle):
    good = PLAIN if isinstance(bad["completion"], str) else CHAT
    path = _jsonl(tmp_path / "data.jsonl", [good, bad, good])
    with pytest.raises(UserError) as refused:
        data.load(path)
    assert f"{path}, line 2" in str(refused.value) and needle in str(refused.value)


def test_pairs_unpair_as_trl_unpairs_them(tmp_path):
    """Each pair's chosen completion desirable, its rejected one not, in TRL's order (per
    block of 1000 pairs, the chosen ones first): the same rows unpair_preference_dataset
    makes, block boundary included."""
    from datasets import Dataset
    from trl.data_utils import unpair_preference_dataset

    rows = [{"prompt": f"Q: {i} + 2 =", "chosen": f" {i + 2}", "rejected": f" {i + 3}"}
            for i in range(1500)]
    unpaired = data.load(_jsonl(tmp_path / "pairs.jsonl", rows)).unpaired()
    assert unpaired.kind == "unpaired" and len(unpaired) == 3000
    theirs = unpair_preference_dataset(Dataset.from_list(rows)).to_list()
    assert [dict(row) for row in unpaired.rows] == [
        {"prompt": r["prompt"], "completion": r["completion"], "label": r["label"]}
        for r in theirs]
    chat = data.load(_jsonl(tmp_path / "chat.jsonl",
                            [{"chosen": [USER, GOOD], "rejected": [USER, BAD]}])).unpaired()
    assert chat.kind == "chat_unpaired"
    assert chat.rows == ({"prompt": [USER], "completion": [GOOD], "label": True},
                         {"prompt": [USER], "completion": [BAD], "label": False})


def test_kto_holds_pairs_out_whole_before_unpairing_them(tmp_path):
    """--eval-split on pairs for KTO: a pair is trained on or held out, both halves."""
    from ftlaunch.launch import checks
    from ftlaunch.plan import job as job_mod

    rows = [{"prompt": f"Q: {i} + 2 =", "chosen": f" {i + 2}", "rejected": f" {i + 3}"}
            for i in range(40)]
    path = _jsonl(tmp_path / "pairs.jsonl", rows)
    job = job_mod.resolve(job_mod.Options(model="tiny", data=str(path), objective="kto",
                                          eval_split=0.25, global_batch_size=4),
                          detect_output_dir=False, validate=False)
    train, held = checks.load_data(job)
    assert (train.kind, len(train), len(held)) == ("unpaired", 60, 20)
    prompts = {name: [row["prompt"] for row in part.rows]
               for name, part in (("train", train), ("held", held))}
    assert not set(prompts["train"]) & set(prompts["held"])
    for part in prompts.values():
        assert all(part.count(prompt) == 2 for prompt in part)
    # The split leaves 60 examples, not 30 pairs, for a global batch of 32: not refused.
    job = job_mod.resolve(job_mod.Options(model="tiny", data=str(path), objective="kto",
                                          eval_split=0.25, global_batch_size=32),
                          detect_output_dir=False, validate=False)
    assert len(checks.load_data(job)[0]) == 60


def test_precomputed_reference_log_probs_need_a_shared_run_directory_on_several_nodes():
    """Rank 0 writes them into the run directory for every rank: node-local run
    directories are refused at the nodes' meeting, as for FSDP's checkpoints."""
    from ftlaunch.launch import multinode
    from ftlaunch.plan import job as job_mod

    def refusal(*sets, engine="auto"):
        return multinode.node_local_refusal(job_mod.resolve(
            job_mod.Options(model="tiny", objective="kto", engine=engine, sets=sets),
            detect_output_dir=False))

    assert refusal() is None
    assert "precompute_ref_log_probs" in refusal("precompute_ref_log_probs=true")
    assert "FSDP" in refusal(engine="fsdp")


def test_objectives_follow_the_data_and_refuse_the_wrong_one(tmp_path):
    unpaired = _jsonl(tmp_path / "unpaired.jsonl", [PLAIN, {**PLAIN, "label": False}])
    pairs = _jsonl(tmp_path / "pairs.jsonl",
                   [{"prompt": "Q: 2 + 2 =", "chosen": " 4", "rejected": " 5"}] * 8)
    plans = {}
    for name, args in (("auto", ("--data", str(unpaired))),
                       ("pairs", ("--data", str(pairs), "--objective", "kto")),
                       ("recipe", ("--data", str(pairs), "--recipe", "kto"))):
        proc = run_ftlaunch("plan", "--model", "tiny", *args, "--json")
        assert proc.returncode == 0, proc.stderr
        plans[name] = json.loads(proc.stdout)
    assert {plan["objective"] for plan in plans.values()} == {"kto"}
    for objective, needle in (("dpo", "Give preference pairs, or --objective kto"),
                              ("sft", "which train with --objective kto")):
        proc = run_ftlaunch("--model", "tiny", "--data", str(unpaired), "--objective", objective,
                            "--output-dir", str(tmp_path / "run"), "--dry-run")
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
    proc = run_ftlaunch("plan", "--model", "tiny", "--objective", "kto",
                        "--set", "train_sampling_strategy=random")
    assert proc.returncode == 2 and "fixed order" in proc.stderr, proc.stderr
    proc = run_ftlaunch("plan", "--model", "tiny", "--objective", "kto",
                        "--set", "train_sampling_strategy=sequential")
    assert proc.returncode == 0, proc.stderr


def test_unbalanced_labels_get_the_weights_that_balance_them(tmp_path):
    """One desirable example in four: the KTO paper's eq. 8 wants desirable_weight 3 to 4
    (or undesirable_weight 1/3 / 1.33 to 1/3), as KTOTrainer would warn; weights in that
    range, or balanced data, get no note."""
    rows = [PLAIN] + [{**PLAIN, "label": False}] * 3
    path = _jsonl(tmp_path / "data.jsonl", rows * 4)
    args = ("--model", "tiny", "--data", str(path), "--dry-run")
    proc = run_ftlaunch(*args, "--output-dir", str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr
    assert ("4 desirable and 12 undesirable examples, and desirable_weight 1 with "
            "undesirable_weight 1 does not balance them") in proc.stdout
    assert "--set desirable_weight=3.00..3.99 or --set undesirable_weight=0.25..0.33" in \
        proc.stdout
    proc = run_ftlaunch(*args, "--set", "desirable_weight=3.5", "--output-dir",
                        str(tmp_path / "b"))
    assert proc.returncode == 0 and "does not balance" not in proc.stdout, proc.stdout
    only_good = _jsonl(tmp_path / "good.jsonl", [PLAIN] * 16)
    proc = run_ftlaunch("--model", "tiny", "--data", str(only_good), "--dry-run",
                        "--output-dir", str(tmp_path / "c"))
    assert proc.returncode == 0 and "16 desirable and 0 undesirable examples" in proc.stdout


def test_a_device_gets_at_least_two_examples_per_micro_batch():
    """KTO's KL estimate pairs each completion with another of its micro-batch: a recipe's
    global batch too small for that is raised (and the plan says so), an asked one is
    refused with the values that work."""
    model = presets.resolve("tiny")
    machine = hardware.parse_spec("4xA100-80GB")
    plan = planner.plan(machine, model, TrainSpec(global_batch_size=4, objective="kto"))
    assert plan.per_device_batch_size >= 2 and plan.global_batch_size == 8
    assert "fewer than 2 examples each, which KTO needs" in plan.batch_note
    with pytest.raises(UserError, match="--global-batch-size 8"):
        batch.check(plan, asked=True)
    sft = planner.plan(machine, model, TrainSpec(global_batch_size=4))
    assert sft.per_device_batch_size == 1 and sft.batch_note is None
    # A share no power of two divides keeps the batch: 15 on 3 processes is 5 each, 30 on 2
    # is 15 each (its largest divisor that fits), 7 on 1 is 7.
    assert batch.micro_batches(30, 2, least=2) == [15, 5, 3]
    for spec, asked, micro in (("3xA100-80GB", 15, 5), ("1xA100-80GB", 7, 7)):
        odd = planner.plan(hardware.parse_spec(spec), model,
                           TrainSpec(global_batch_size=asked, objective="kto"))
        assert (odd.per_device_batch_size, odd.global_batch_size) == (micro, asked)
        batch.check(odd, asked=True)


def test_kto_counts_its_passes_without_gradients():
    """The reference on the completion and on the KL completion, and the policy on the KL
    completion: three forwards (2N each) per token beside the training step's; one when
    the reference log-probs are precomputed."""
    from ftlaunch.plan import estimate

    model = presets.resolve("llama-8b")
    machine = hardware.parse_spec("1xA100-80GB")
    flops = {}
    for name, spec in (("sft", TrainSpec()),
                       ("dpo", TrainSpec(objective="dpo", reference_forward=True)),
                       ("kto", TrainSpec(objective="kto", reference_forward=True)),
                       ("kto-precomputed", TrainSpec(objective="kto"))):
        flops[name] = estimate.flops_per_token(model, planner.plan(machine, model, spec))
    n = model.parameters
    assert flops["dpo"] - flops["sft"] == pytest.approx(2 * n)
    assert flops["kto"] - flops["sft"] == pytest.approx(6 * n)
    assert flops["kto-precomputed"] - flops["sft"] == pytest.approx(2 * n)


@pytest.mark.parametrize("rows", [
    [PLAIN, {"prompt": "Say hi.", "completion": "No.", "label": False},
     {"prompt": "Say bye.", "completion": "Bye!", "label": True},
     {"prompt": "Q: 3 + 3 =", "completion": " 7", "label": False}],
    [CHAT, {"prompt": [USER, GOOD, {"role": "user", "content": "And 3 + 3?"}],
            "completion": [{"role": "assistant", "content": "6"}], "label": True},
     {"prompt": [USER], "completion": [GOOD], "label": True},
     {"prompt": [{"role": "user", "content": "Hi?"}],
      "completion": [{"role": "assistant", "content": "Hello."}], "label": False}],
], ids=["unpaired", "chat_unpaired"])
def test_cached_examples_are_what_kto_trainer_builds_and_its_masks_cover_the_answers(
        tmp_path, tiny_chat_tokenizer, rows):
    """TRL's KTOTrainer._prepare_dataset on the rows, and the launcher's tokenization with
    the worker's last steps (worker.setup.trainer_class) on the cache's columns, give the
    same ids, labels and KL completions; DataCollatorForUnpairedPreference's
    completion_mask then marks the answer, never the prompt. Training examples are
    shuffled once with the run's seed, the same way on every rank and every resume."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    from ftlaunch.worker.setup import trainer_class

    dataset = data.load(_jsonl(tmp_path / "data.jsonl", rows))
    columns = {key: [row[key] for row in dataset.rows] for key in dataset.rows[0]}
    ours = preference.tokenize_batch(columns, list(range(len(rows))), tiny_chat_tokenizer,
                                     dataset.kind)
    cached = Dataset.from_dict({name: ours[name] for name in preference.UNPAIRED_COLUMNS})
    stub = SimpleNamespace(_tokenizer=tiny_chat_tokenizer, calculate_KL=True, desirable_weight=1.0,
                           undesirable_weight=1.0)
    # First with a max_length the longest prompt fills: that example is left out by both.
    # Ours shuffles the examples with the run's seed (datasets' permutation of the kept
    # ones, which depends only on their count and the seed): TRL gets them in that order.
    longest = max(len(p) for p in ours["prompt_ids"])
    for max_length in (longest, None):
        args = KTOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, max_length=max_length,
                         report_to="none", per_device_train_batch_size=3, seed=7)
        kept = [row for row, prompt in zip(rows, ours["prompt_ids"])
                if max_length is None or len(prompt) < max_length]
        order = Dataset.from_dict({"i": range(len(kept))}).shuffle(seed=7)["i"]
        assert order != sorted(order)
        theirs = KTOTrainer._prepare_dataset(stub, Dataset.from_list([kept[i] for i in order]),
                                             tiny_chat_tokenizer, args, "train")
        prepared = trainer_class("kto")._prepare_dataset(stub, cached, None, args, "train")
        assert len(prepared) == len(theirs) == len(rows) - (max_length is not None)
        for name in (*preference.UNPAIRED_COLUMNS, "KL_completion_ids"):
            assert prepared[name] == theirs[name], name
    # The same on every rank and every resume; held-out examples likewise.
    assert trainer_class("kto")._prepare_dataset(stub, cached, None, args, "eval")[
        "completion_ids"] == prepared["completion_ids"]
    rows = [rows[i] for i in order]
    dataset = data.load(_jsonl(tmp_path / "shuffled.jsonl", rows))

    examples = prepared.to_list()
    collated = DataCollatorForUnpairedPreference(pad_token_id=tiny_chat_tokenizer.pad_token_id or 0)(
        examples)
    assert collated["label"].tolist() == [row["label"] for row in rows]
    for index, row in enumerate(dataset.rows):
        mask = collated["completion_mask"][index].bool()
        trained = tiny_chat_tokenizer.decode(collated["input_ids"][index][mask])
        answer = row["completion"] if isinstance(row["completion"], str) else \
            row["completion"][0]["content"]
        assert trained.strip().startswith(answer.strip()), (trained, answer)
        prompt = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
        assert prompt not in trained
        sequence, marks = preference.sequences(examples[index])["completion"]
        assert [t for t, m in zip(sequence, marks) if m] == \
            collated["input_ids"][index][mask].tolist()
