"""Training data: format detection and validation with file and line, and the bundled demo set."""

import json

import pytest

from ftlaunch import data, demo_data
from ftlaunch.errors import UserError
from ftlaunch.resources import demo_data_path

CHAT = {"messages": [{"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}]}


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _jsonl(path, rows):
    return _write(path, [json.dumps(r) for r in rows])


def test_messages_format_detected(tmp_path):
    path = _jsonl(tmp_path / "chat.jsonl", [CHAT, CHAT, CHAT])
    ds = data.load(path)
    assert ds.format == "messages"
    assert len(ds) == 3
    assert ds.rows[0] == CHAT
    assert ds.path == path.resolve()
    assert ds.fingerprint.startswith("sha256:")


def test_text_format_detected(tmp_path):
    path = _jsonl(tmp_path / "text.jsonl", [{"text": "hello"}, {"text": "world", "id": 2}])
    ds = data.load(path)
    assert ds.format == "text"
    assert [r["text"] for r in ds.rows] == ["hello", "world"]


def test_blank_lines_are_skipped(tmp_path):
    path = _write(tmp_path / "gaps.jsonl", [json.dumps({"text": "a"}), "", "   ",
                                            json.dumps({"text": "b"})])
    assert len(data.load(path)) == 2


def test_bad_json_names_file_and_line(tmp_path):
    path = _write(tmp_path / "broken.jsonl",
                  [json.dumps(CHAT), json.dumps(CHAT), '{"messages": [', json.dumps(CHAT)])
    with pytest.raises(UserError) as info:
        data.load(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 3" in message


def test_non_object_line(tmp_path):
    path = _write(tmp_path / "list.jsonl", [json.dumps(CHAT), "[1, 2]"])
    with pytest.raises(UserError) as info:
        data.load(path)
    assert "line 2" in str(info.value)


def test_neither_messages_nor_text(tmp_path):
    path = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(UserError) as info:
        data.load(path)
    message = str(info.value)
    assert str(path) in message
    assert "messages" in message and "text" in message


def test_later_row_missing_messages(tmp_path):
    path = _jsonl(tmp_path / "mixed.jsonl", [CHAT, {"text": "stray"}])
    with pytest.raises(UserError) as info:
        data.load(path)
    assert "line 2" in str(info.value)
    assert "messages" in str(info.value)


def test_later_row_missing_text(tmp_path):
    path = _jsonl(tmp_path / "mixed.jsonl", [{"text": "ok"}, {"text": "ok"}, {"body": "x"}])
    with pytest.raises(UserError) as info:
        data.load(path)
    assert "line 3" in str(info.value)
    assert "text" in str(info.value)


def test_explicit_format_that_does_not_match(tmp_path):
    path = _jsonl(tmp_path / "chat.jsonl", [CHAT])
    with pytest.raises(UserError):
        data.load(path, format="text")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(UserError) as info:
        data.load(path)
    assert str(path) in str(info.value)


def test_only_blank_lines_is_empty(tmp_path):
    path = _write(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(UserError):
        data.load(path)


def test_conversation_without_assistant_turn(tmp_path):
    no_reply = {"messages": [{"role": "system", "content": "be nice"},
                             {"role": "user", "content": "hello?"}]}
    path = _jsonl(tmp_path / "noreply.jsonl", [CHAT, no_reply])
    with pytest.raises(UserError) as info:
        data.load(path)
    assert "line 2" in str(info.value)
    assert "assistant" in str(info.value)


@pytest.mark.parametrize("turn", [
    {"role": "robot", "content": "beep"},
    {"role": "user"},
    {"role": "user", "content": 5},
    "just a string",
])
def test_malformed_turns(tmp_path, turn):
    row = {"messages": [turn, {"role": "assistant", "content": "ok"}]}
    path = _jsonl(tmp_path / "turns.jsonl", [row])
    with pytest.raises(UserError) as info:
        data.load(path)
    assert "line 1" in str(info.value)


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


def test_no_system_prompt_leaves_rows_alone(tmp_path):
    path = _jsonl(tmp_path / "chat.jsonl", [CHAT])
    assert data.load(path).rows[0] == CHAT


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(UserError) as info:
        data.load(tmp_path / "nope.jsonl")
    assert "no such file" in str(info.value)
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(UserError):
        data.load(csv)
    with pytest.raises(UserError):
        data.load(tmp_path)  # a directory


def test_fingerprint_follows_content(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [CHAT])
    b = _jsonl(tmp_path / "b.jsonl", [CHAT])
    c = _jsonl(tmp_path / "c.jsonl", [CHAT, CHAT])
    assert data.fingerprint(a) == data.fingerprint(b)
    assert data.fingerprint(a) != data.fingerprint(c)


def test_bundled_demo_data_is_what_the_generator_writes(tmp_path):
    written = tmp_path / "sub" / "demo.jsonl"
    demo_data.write(written)
    bundled = demo_data_path()
    assert bundled.is_file()
    assert written.read_bytes() == bundled.read_bytes()
    assert len(bundled.read_bytes().splitlines()) == 400


def test_bundled_demo_data_loads_as_chat():
    ds = data.load(demo_data_path())
    assert ds.format == "messages"
    assert len(ds) == 400
