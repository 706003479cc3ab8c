"""Training data: sources, format detection, canonical rows, validation with file and line,
fingerprints, and the bundled demo set. Real files written into tmp_path; nothing downloads."""

import csv
import json
from pathlib import Path

import pytest

from ftlaunch.data import read as data
from ftlaunch.data import demo as demo_data
from ftlaunch.errors import UserError
from ftlaunch.resources import demo_data_path

CHAT = {"messages": [{"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}]}
SHAREGPT = {"conversations": [{"from": "system", "value": "Be terse."},
                              {"from": "human", "value": "2+2?"},
                              {"from": "gpt", "value": "4"},
                              {"from": "user", "value": "and 3+3?"},
                              {"from": "model", "value": "6"}]}
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"}
ALPACA_NO_INPUT = {"instruction": "Say hi.", "input": "", "output": "hi"}
PROMPT_COMPLETION = {"prompt": "2+2=", "completion": "4"}
GUANACO = {"text": "### Human: 2+2?### Assistant: 4### Human: and 3+3?\n### Assistant: 6\n"}
TEXT = {"text": "hello world"}


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _jsonl(path, rows):
    return _write(path, [json.dumps(r) for r in rows])


def _csv(path, header, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _error(source, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        data.load(source, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- formats: detection and output

def test_messages_format_detected(tmp_path):
    path = _jsonl(tmp_path / "chat.jsonl", [CHAT, CHAT, CHAT])
    ds = data.load(path)
    assert (ds.format, ds.kind) == ("messages", "conversational")
    assert len(ds) == 3
    assert ds.rows[0] == CHAT
    assert ds.path == path.resolve()
    assert ds.fingerprint.startswith("sha256:")


def test_sharegpt_format(tmp_path):
    ds = data.load(_jsonl(tmp_path / "share.jsonl", [SHAREGPT]))
    assert (ds.format, ds.kind) == ("sharegpt", "conversational")
    assert ds.rows == ({"messages": [{"role": "system", "content": "Be terse."},
                                     {"role": "user", "content": "2+2?"},
                                     {"role": "assistant", "content": "4"},
                                     {"role": "user", "content": "and 3+3?"},
                                     {"role": "assistant", "content": "6"}]},)


def test_alpaca_format(tmp_path):
    no_input_key = {"instruction": "Name a colour.", "output": "red"}
    ds = data.load(_jsonl(tmp_path / "alpaca.jsonl", [ALPACA, ALPACA_NO_INPUT, no_input_key]))
    assert (ds.format, ds.kind) == ("alpaca", "conversational")
    assert ds.rows == (
        {"messages": [{"role": "user", "content": "Add the numbers.\n\n2 and 2"},
                      {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "Say hi."},
                      {"role": "assistant", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "Name a colour."},
                      {"role": "assistant", "content": "red"}]},
    )


def test_prompt_completion_format(tmp_path):
    ds = data.load(_jsonl(tmp_path / "pc.jsonl", [PROMPT_COMPLETION, {**PROMPT_COMPLETION,
                                                                      "id": 7}]))
    assert (ds.format, ds.kind) == ("prompt_completion", "prompt_completion")
    assert ds.rows == ({"prompt": "2+2=", "completion": "4"},) * 2


def test_human_assistant_format(tmp_path):
    ds = data.load(_jsonl(tmp_path / "guanaco.jsonl", [GUANACO]))
    assert (ds.format, ds.kind) == ("human_assistant", "conversational")
    assert ds.rows == ({"messages": [{"role": "user", "content": "2+2?"},
                                     {"role": "assistant", "content": "4"},
                                     {"role": "user", "content": "and 3+3?"},
                                     {"role": "assistant", "content": "6"}]},)


def test_text_format_detected(tmp_path):
    path = _jsonl(tmp_path / "text.jsonl", [{"text": "hello"}, {"text": "world", "id": 2}])
    ds = data.load(path)
    assert (ds.format, ds.kind) == ("text", "text")
    assert ds.rows == ({"text": "hello"}, {"text": "world"})


def test_text_mentioning_only_one_marker_is_plain_text(tmp_path):
    ds = data.load(_jsonl(tmp_path / "t.jsonl", [{"text": "### Human: no reply here"}]))
    assert ds.format == "text"


@pytest.mark.parametrize("row, expected, kind", [
    (CHAT, "messages", "conversational"), (SHAREGPT, "sharegpt", "conversational"),
    (ALPACA, "alpaca", "conversational"), (PROMPT_COMPLETION, "prompt_completion",
                                           "prompt_completion"),
    (GUANACO, "human_assistant", "conversational"), (TEXT, "text", "text"),
])
def test_detection_and_kinds(tmp_path, row, expected, kind):
    ds = data.load(_jsonl(tmp_path / "d.jsonl", [row]))
    assert ds.format == expected
    assert ds.kind == kind
    assert data.load(ds.path, ds.format).rows == ds.rows  # what a worker does with run.yaml


def test_format_override(tmp_path):
    guanaco = _jsonl(tmp_path / "guanaco.jsonl", [GUANACO])
    as_text = data.load(guanaco, format="text")
    assert (as_text.format, as_text.kind) == ("text", "text")
    assert as_text.rows == (GUANACO,)
    both = {"instruction": "i", "output": "o", "text": "t"}
    path = _jsonl(tmp_path / "both.jsonl", [both])
    assert data.load(path).format == "alpaca"
    assert data.load(path, "text").rows == ({"text": "t"},)


def test_unknown_format_name(tmp_path):
    message = _error(_jsonl(tmp_path / "c.jsonl", [CHAT]), format="chatml")
    assert "chatml" in message and "sharegpt" in message


# ---------------------------------------------------------------- sources

def test_json_array(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([CHAT, CHAT], indent=2),
                    encoding="utf-8")
    ds = data.load(str(path))  # a str source works like a Path
    assert ds.rows == (CHAT, CHAT)
    assert ds.path == path.resolve()


def test_json_lines_in_a_json_file(tmp_path):
    ds = data.load(_jsonl(tmp_path / "lines.json", [TEXT, TEXT]))
    assert ds.rows == (TEXT, TEXT)


def test_json_array_item_errors_name_the_item(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([ALPACA, {"instruction": "x"}]), encoding="utf-8")
    message = _error(path)
    assert f"{path}, item 2 (format alpaca): missing `output`" in message


def test_single_json_object_is_explained(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(CHAT, indent=2), encoding="utf-8")
    message = _error(path)
    assert str(path) in message and "single JSON object" in message


def test_csv(tmp_path):
    path = _csv(tmp_path / "alpaca.csv", ["instruction", "input", "output"],
                [[ALPACA["instruction"], ALPACA["input"], ALPACA["output"]],
                 ["Say hi.", "", "hi,\nthere"]])
    ds = data.load(path)
    assert (ds.format, ds.kind) == ("alpaca", "conversational")
    assert ds.rows[0]["messages"][0]["content"] == "Add the numbers.\n\n2 and 2"
    assert ds.rows[1] == {"messages": [{"role": "user", "content": "Say hi."},
                                       {"role": "assistant", "content": "hi,\nthere"}]}


def test_csv_chat_column_holds_json(tmp_path):
    path = _csv(tmp_path / "chat.csv", ["messages"], [[json.dumps(CHAT["messages"])]])
    assert data.load(path).rows == (CHAT,)


def test_csv_missing_column(tmp_path):
    path = _csv(tmp_path / "half.csv", ["instruction", "input"], [["a", "b"], ["c", "d"]])
    message = _error(path)
    assert str(path) in message
    assert "format alpaca" in message and "no `output` column" in message
    assert "input, instruction" in message  # the columns it does have


def test_csv_errors_name_the_row(tmp_path):
    path = _csv(tmp_path / "pc.csv", ["prompt", "completion"],
                [["a", "b"], ["c", "d"], ["e", ""]])
    message = _error(path)
    assert f"{path}, row 4 (format prompt_completion)" in message  # the header is row 1
    assert "`completion` is empty" in message
    short = tmp_path / "short.csv"
    short.write_text("prompt,completion\na,b\nc\n", encoding="utf-8")
    assert f"{short}, row 3 (format prompt_completion): missing `completion`" in _error(short)
    long = tmp_path / "long.csv"
    long.write_text("text\nx\ny,z\n", encoding="utf-8")
    assert f"{long}, row 3" in _error(long)


def test_parquet(tmp_path):
    path = _parquet(tmp_path / "chat.parquet", [CHAT, CHAT])
    ds = data.load(path)
    assert (ds.format, len(ds), ds.rows[0]) == ("messages", 2, CHAT)
    alpaca = _parquet(tmp_path / "alpaca.parquet", [ALPACA, {**ALPACA_NO_INPUT, "input": None}])
    assert data.load(alpaca).rows[1]["messages"][0]["content"] == "Say hi."


def test_parquet_errors(tmp_path):
    path = _parquet(tmp_path / "pc.parquet", [PROMPT_COMPLETION, {"prompt": "x",
                                                                  "completion": None}])
    assert f"{path}, row 2 (format prompt_completion): missing `completion`" in _error(path)
    wrong = _parquet(tmp_path / "wrong.parquet", [TEXT])
    assert "no `messages` column" in _error(wrong, format="messages")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    assert str(broken) in _error(broken)


def test_directory_of_files(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    _jsonl(folder / "b.jsonl", [{"text": "b1"}])
    _jsonl(folder / "a.jsonl", [{"text": "a1"}, {"text": "a2"}])
    (folder / "README.md").write_text("not data\n", encoding="utf-8")
    ds = data.load(folder)
    assert ds.rows == ({"text": "a1"}, {"text": "a2"}, {"text": "b1"})  # files in name order
    assert ds.path == folder.resolve()
    assert ds.fingerprint == data.fingerprint(folder)
    _jsonl(folder / "c.jsonl", [{"text": "c1"}, {"nope": 1}])
    assert f"{folder / 'c.jsonl'}, line 2 (format text): missing `text`" in _error(folder)


def test_directory_problems(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x", encoding="utf-8")
    assert "no .jsonl" in _error(empty)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _jsonl(mixed / "a.jsonl", [TEXT])
    _csv(mixed / "b.csv", ["text"], [["x"]])
    message = _error(mixed)
    assert ".csv" in message and ".jsonl" in message
    formats = tmp_path / "formats"
    formats.mkdir()
    _jsonl(formats / "a.jsonl", [CHAT])
    _jsonl(formats / "b.jsonl", [ALPACA])
    message = _error(formats)
    assert "messages" in message and "alpaca" in message and "b.jsonl" in message


def test_save_to_disk_dataset(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list([ALPACA, ALPACA_NO_INPUT]).save_to_disk(str(folder))
    ds = data.load(folder)
    assert (ds.format, ds.kind, len(ds)) == ("alpaca", "conversational", 2)
    assert ds.rows[1]["messages"][0] == {"role": "user", "content": "Say hi."}
    assert ds.path == folder.resolve()
    assert ds.fingerprint == data.fingerprint(folder) == data.load(str(folder)).fingerprint
    other = tmp_path / "other"
    datasets.Dataset.from_list([ALPACA]).save_to_disk(str(other))
    assert data.load(other).fingerprint != ds.fingerprint


def test_save_to_disk_dataset_dict(tmp_path):
    import datasets

    folder = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([PROMPT_COMPLETION]),
                          "test": datasets.Dataset.from_list([TEXT])}).save_to_disk(str(folder))
    ds = data.load(folder)
    assert ds.format == "prompt_completion"
    assert ds.rows == (PROMPT_COMPLETION,)
    no_train = tmp_path / "no_train"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list([TEXT]),
                          "test": datasets.Dataset.from_list([TEXT])}).save_to_disk(str(no_train))
    message = _error(no_train)
    assert "validation" in message and "test" in message and "train" in message


def test_save_to_disk_errors_name_the_row(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list([TEXT, {"text": "  "}]).save_to_disk(str(folder))
    assert f"{folder}, row 2 (format text): `text` is empty" in _error(folder)


def test_hub_id_offline_is_a_user_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    for module, name in ((datasets.config, "HF_HUB_OFFLINE"),
                         (datasets.config, "HF_DATASETS_OFFLINE"),
                         (huggingface_hub.constants, "HF_HUB_OFFLINE")):
        monkeypatch.setattr(module, name, True)  # never the network, whatever imported first
    message = _error("ftlaunch-test-org/no-such-dataset")
    assert "ftlaunch-test-org/no-such-dataset" in message
    assert "could not be reached" in message and "local" in message


@pytest.mark.parametrize("source", ["nope.jsonl", "./nope", "/no/such/dir/data", "data/x.csv",
                                    "org/name.parquet", "plainword"])
def test_missing_local_path(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert "no such file" in _error(source)


def test_missing_file_and_wrong_suffix(tmp_path):
    assert "no such file" in _error(tmp_path / "nope.jsonl")
    txt = tmp_path / "data.txt"
    txt.write_text("hello\n", encoding="utf-8")
    assert ".txt" in _error(txt)


# ---------------------------------------------------------------- malformed data

def test_bad_json_names_file_and_line(tmp_path):
    path = _write(tmp_path / "broken.jsonl",
                  [json.dumps(CHAT), json.dumps(CHAT), '{"messages": [', json.dumps(CHAT)])
    message = _error(path)
    assert str(path) in message
    assert "line 3" in message


def test_blank_lines_are_skipped(tmp_path):
    path = _write(tmp_path / "gaps.jsonl", [json.dumps({"text": "a"}), "", "   ",
                                            json.dumps({"text": "b"})])
    assert len(data.load(path)) == 2


def test_non_object_line(tmp_path):
    path = _write(tmp_path / "list.jsonl", [json.dumps(CHAT), "[1, 2]"])
    assert "line 2" in _error(path)


def test_unrecognised_keys(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    message = _error(path)
    assert str(path) in message and "line 1" in message
    assert "messages" in message and "conversations" in message and "text" in message
    assert "data.format" in message


def test_missing_field_names_field_and_format(tmp_path):
    path = _jsonl(tmp_path / "alpaca.jsonl", [ALPACA] * 6 + [{"instruction": "x", "input": ""}])
    assert f"{path}, line 7 (format alpaca): missing `output`." in _error(path)
    neither = _jsonl(tmp_path / "pc.jsonl", [PROMPT_COMPLETION, {"id": 1}])
    assert "line 2 (format prompt_completion): missing `prompt`, `completion`" in _error(neither)


def test_several_bad_rows_are_counted(tmp_path):
    rows = [TEXT, {"text": ""}, {"x": 1}, TEXT, {"text": 5}, {"text": " "}, {"text": ""}]
    message = _error(_jsonl(tmp_path / "t.jsonl", rows))
    assert message.startswith(f"{tmp_path / 't.jsonl'}, line 2 (format text): `text` is empty")
    assert "4 more examples have problems" in message
    assert "line 3 (format text): missing `text`" in message
    assert "line 5" in message and "and 1 more" in message
    assert "The format was told from the first example" in message
    # Named by the user, the format is no guess: no hint.
    named = _error(_jsonl(tmp_path / "n.jsonl", rows), format="text")
    assert "The format was told from the first example" not in named


def test_later_row_missing_messages(tmp_path):
    path = _jsonl(tmp_path / "mixed.jsonl", [CHAT, {"text": "stray"}])
    message = _error(path)
    assert "line 2" in message and "missing `messages`" in message


def test_later_row_missing_text(tmp_path):
    path = _jsonl(tmp_path / "mixed.jsonl", [{"text": "ok"}, {"text": "ok"}, {"body": "x"}])
    assert f"{path}, line 3 (format text): missing `text`." in _error(path)


def test_explicit_format_that_does_not_match(tmp_path):
    path = _jsonl(tmp_path / "chat.jsonl", [CHAT])
    assert "line 1 (format text): missing `text`" in _error(path, format="text")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    message = _error(path)
    assert str(path) in message and "no examples" in message
    empty_csv = _csv(tmp_path / "header_only.csv", ["text"], [])
    assert "no examples" in _error(empty_csv)
    empty_array = tmp_path / "empty.json"
    empty_array.write_text("[]", encoding="utf-8")
    assert "no examples" in _error(empty_array)


def test_only_blank_lines_is_empty(tmp_path):
    path = _write(tmp_path / "blank.jsonl", ["", "  "])
    assert "no examples" in _error(path)


def test_conversation_without_assistant_turn(tmp_path):
    no_reply = {"messages": [{"role": "system", "content": "be nice"},
                             {"role": "user", "content": "hello?"}]}
    path = _jsonl(tmp_path / "noreply.jsonl", [CHAT, no_reply])
    message = _error(path)
    assert "line 2" in message and "assistant" in message


@pytest.mark.parametrize("row, needle", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
     "assistant message 2 in `messages` is empty"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
     "assistant message 2 in `conversations` is empty"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
     "`from` 'bot'"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "no assistant message"),
    ({"instruction": "i", "output": ""}, "`output` is empty"),
    ({"instruction": "", "input": "", "output": "o"}, "no prompt"),
    ({"prompt": "p", "completion": ""}, "`completion` is empty"),
    ({"prompt": 1, "completion": "c"}, "`prompt` must be a string"),
    ({"text": ""}, "`text` is empty"),
])
def test_empty_and_malformed_examples(tmp_path, row, needle):
    path = _jsonl(tmp_path / "bad.jsonl", [row])
    message = _error(path)
    assert "line 1" in message and needle in message


@pytest.mark.parametrize("text, needle", [
    ("### Human: q### Assistant:   ", "assistant message 2 in `text` is empty"),
    ("### Human: q", "no assistant message in `text`"),
    ("just prose", "no `### Human:` / `### Assistant:` turns"),
    ("Intro ### Human: q### Assistant: a", "text before its first"),
    ("### Human:### Assistant: a", "empty `### Human:` turn"),
])
def test_human_assistant_problems(tmp_path, text, needle):
    path = _jsonl(tmp_path / "g.jsonl", [GUANACO, {"text": text}])
    message = _error(path)
    assert "line 2 (format human_assistant)" in message and needle in message


@pytest.mark.parametrize("turn, needle", [
    ({"role": "robot", "content": "beep"},
     "`role` 'robot' is not one of system, user, assistant"),
    ({"role": "user"}, "every entry of `messages` needs `role` and `content`"),
    ({"role": "user", "content": 5}, "`content` must be a string"),
    ("just a string", "every entry of `messages` needs `role` and `content`"),
])
def test_malformed_turns(tmp_path, turn, needle):
    row = {"messages": [turn, {"role": "assistant", "content": "ok"}]}
    path = _jsonl(tmp_path / "turns.jsonl", [row])
    assert f"{path}, line 1 (format messages): {needle}" in _error(path)


# ---------------------------------------------------------------- system prompt

def test_system_prompt_inserted_when_absent(tmp_path):
    with_system = {"messages": [{"role": "system", "content": "Original."},
                                {"role": "user", "content": "q"},
                                {"role": "assistant", "content": "a"}]}
    path = _jsonl(tmp_path / "chat.jsonl", [CHAT, with_system])
    ds = data.load(path, system_prompt="Be brief.")
    first, second = (row["messages"] for row in ds.rows)
    assert first[0] == {"role": "system", "content": "Be brief."}
    assert first[1:] == CHAT["messages"]
    assert second == with_system["messages"]  # an existing system turn is kept as is


@pytest.mark.parametrize("row", [ALPACA, GUANACO, SHAREGPT])
def test_system_prompt_for_every_chat_format(tmp_path, row):
    plain = data.load(_jsonl(tmp_path / "a.jsonl", [row]))
    prompted = data.load(_jsonl(tmp_path / "b.jsonl", [row]), system_prompt="Be brief.")
    turns = plain.rows[0]["messages"]
    if turns[0]["role"] == "system":  # sharegpt's own system turn wins
        assert prompted.rows == plain.rows
    else:
        assert prompted.rows[0]["messages"] == [{"role": "system", "content": "Be brief."},
                                                *turns]


@pytest.mark.parametrize("row", [PROMPT_COMPLETION, TEXT])
def test_system_prompt_rejected_for_non_chat_data(tmp_path, row):
    path = _jsonl(tmp_path / "plain.jsonl", [row])
    message = _error(path, system_prompt="Be brief.")
    assert "chat data only" in message and str(path) in message
    assert data.load(path, system_prompt=None).rows == (row,)


# ---------------------------------------------------------------- fingerprints

def test_fingerprint_follows_content(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [CHAT])
    b = _jsonl(tmp_path / "b.jsonl", [CHAT])
    c = _jsonl(tmp_path / "c.jsonl", [CHAT, CHAT])
    assert data.fingerprint(a) == data.fingerprint(b)
    assert data.fingerprint(a) != data.fingerprint(c)
    assert data.load(a).fingerprint == data.load(a).fingerprint == data.fingerprint(a)


def test_directory_fingerprint_follows_names_and_content(tmp_path):
    def shard_folder(name, files):
        folder = tmp_path / name
        folder.mkdir()
        for file, rows in files.items():
            _jsonl(folder / file, rows)
        return folder

    one = shard_folder("one", {"a.jsonl": [TEXT], "b.jsonl": [TEXT, TEXT]})
    same = shard_folder("same", {"a.jsonl": [TEXT], "b.jsonl": [TEXT, TEXT]})
    renamed = shard_folder("renamed", {"a.jsonl": [TEXT], "c.jsonl": [TEXT, TEXT]})
    moved = shard_folder("moved", {"a.jsonl": [TEXT, TEXT], "b.jsonl": [TEXT]})
    assert data.load(one).fingerprint == data.load(same).fingerprint
    assert data.load(one).fingerprint != data.load(renamed).fingerprint
    assert data.load(one).fingerprint != data.load(moved).fingerprint
    before = data.fingerprint(one)
    (one / "notes.md").write_text("not read, not hashed\n", encoding="utf-8")
    assert data.fingerprint(one) == before
    _jsonl(one / "b.jsonl", [TEXT, {"text": "changed"}])
    assert data.fingerprint(one) != before


# ---------------------------------------------------------------- the bundled demo set

def test_bundled_demo_data_is_what_the_generator_writes(tmp_path):
    written = tmp_path / "sub" / "demo.jsonl"
    demo_data.write(written)
    bundled = demo_data_path()
    assert bundled.is_file()
    assert written.read_bytes() == bundled.read_bytes()
    assert len(bundled.read_bytes().splitlines()) == 400


def test_bundled_demo_data_loads_as_chat():
    ds = data.load(demo_data_path())
    assert (ds.format, ds.kind) == ("messages", "conversational")
    assert len(ds) == 400
    assert isinstance(ds.path, Path)
