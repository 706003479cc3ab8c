"""Training data: read, detect the format, validate, fingerprint. No torch.

The launcher reads and validates the data once before any worker starts, so
a bad line fails in a second with its file and line number instead of inside
eight ranks after model loading. Workers read the same file with the same code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ftlaunch.errors import UserError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Dataset:
    path: Path
    format: str  # messages | text
    rows: tuple[dict, ...]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.rows)


def fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def load(path: Path, format: str = "auto", system_prompt: str | None = None) -> Dataset:
    path = Path(path)
    if not path.exists():
        raise UserError(f"--data {path}: no such file.")
    if path.is_dir() or path.suffix not in (".jsonl", ".json"):
        raise UserError(f"--data {path}: this version reads .jsonl files (one JSON object per "
                        "line, with a `messages` list or a `text` field).")
    if format not in ("auto", "messages", "text"):
        raise UserError(f"data.format {format!r} is not one of auto, messages, text.")
    rows = _read_json_array(path) if _is_json_array(path) else _read_jsonl(path)
    if not rows:
        raise UserError(f"--data {path} holds no examples.")
    detected = _detect(rows[0], path) if format == "auto" else format
    checked = tuple(_check(row, detected, path, line, system_prompt) for line, row in rows)
    return Dataset(path=path.resolve(), format=detected, rows=checked, fingerprint=fingerprint(path))


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return path.suffix == ".json" and head.startswith(b"[")


def _read_json_array(path: Path) -> list[tuple[int, dict]]:
    """A .json file holding one list of examples; "line" numbers are list positions."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}).") from None
    for index, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise UserError(f"{path}, item {index}: expected a JSON object, got "
                            f"{type(row).__name__}.")
    return list(enumerate(rows, start=1))


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}, line {number}: not valid JSON ({exc.msg} at "
                                    f"column {exc.colno}).") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}, line {number}: expected a JSON object, got "
                                    f"{type(row).__name__}.")
                rows.append((number, row))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text.") from None
    except OSError as exc:
        raise UserError(f"Cannot read {path}: {exc.strerror}.") from None
    return rows


def _detect(first: tuple[int, dict], path: Path) -> str:
    _, row = first
    if "messages" in row:
        return "messages"
    if "text" in row:
        return "text"
    raise UserError(f"{path}, line {first[0]}: cannot tell the data format from keys "
                    f"{sorted(row)}; expected `messages` (chat) or `text`. Set it with "
                    "--set data.format=messages|text.")


def _check(row: dict, fmt: str, path: Path, line: int, system_prompt: str | None) -> dict:
    where = f"{path}, line {line} (format {fmt})"
    if fmt == "text":
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise UserError(f"{where}: missing or empty `text` string.")
        return {"text": row["text"]}
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: missing `messages` list.")
    for turn in messages:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise UserError(f"{where}: every message needs `role` and `content`.")
        if turn["role"] not in ROLES:
            raise UserError(f"{where}: role {turn['role']!r} is not one of {', '.join(ROLES)}.")
        if not isinstance(turn["content"], str):
            raise UserError(f"{where}: message content must be a string.")
    if not any(t["role"] == "assistant" for t in messages):
        raise UserError(f"{where}: no assistant message, so nothing to train on.")
    turns = [{"role": t["role"], "content": t["content"]} for t in messages]
    if system_prompt and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system_prompt})
    return {"messages": turns}
