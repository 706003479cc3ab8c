"""Training data formats: tell them apart, check every example, convert it to its
canonical kind. No torch, no files: data/read.py reads the rows this converts.

Source formats, told apart by the first example's keys unless data.format says:
    messages           {"messages": [{"role", "content"}, ...]}          (OpenAI chat)
    sharegpt           {"conversations": [{"from", "value"}, ...]}
    alpaca             {"instruction", "input" (optional), "output"}
    prompt_completion  {"prompt", "completion"}
    human_assistant    {"text": "### Human: ... ### Assistant: ..."}     (guanaco style)
    text               {"text"}
    preference         {"prompt", "chosen", "rejected"}: strings                (DPO pairs)
    chat_preference    {"prompt", "chosen", "rejected"}: message lists, or {"chosen",
                       "rejected"} as whole conversations sharing the prompt (TRL's
                       conversational and implicit-prompt preference formats)
    unpaired           {"prompt", "completion", "label"}: strings, label true for a
                       desirable completion, false for an undesirable one      (KTO)
    chat_unpaired      {"prompt", "completion", "label"}: message lists (TRL's
                       conversational unpaired preference format)
Every example comes out in one of these canonical kinds (Dataset.kind):
    conversational     {"messages": [{"role", "content"}, ...]}   messages, sharegpt, alpaca,
                                                                    human_assistant
    prompt_completion  {"prompt": str, "completion": str}
    text               {"text": str}
    preference         {"prompt": str, "chosen": str, "rejected": str}
    chat_preference    {"prompt": [turns], "chosen": [assistant turns], "rejected": [...]}:
                       the prompt always explicit
    unpaired           {"prompt": str, "completion": str, "label": bool}
    chat_unpaired      {"prompt": [turns], "completion": [assistant turns], "label": bool}
The preference kinds train with DPO (PREFERENCE_KINDS), the unpaired ones with KTO
(UNPAIRED_KINDS; KTO also takes pairs, each as two unpaired examples: unpair), the
others with SFT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ftlaunch.errors import UserError

ROLES = ("system", "user", "assistant")
# Each source format, and the canonical kind its examples become.
KINDS = {
    "messages": "conversational",
    "sharegpt": "conversational",
    "alpaca": "conversational",
    "prompt_completion": "prompt_completion",
    "human_assistant": "conversational",
    "text": "text",
    "preference": "preference",
    "chat_preference": "chat_preference",
    "unpaired": "unpaired",
    "chat_unpaired": "chat_unpaired",
}
PREFERENCE_KINDS = ("preference", "chat_preference")
UNPAIRED_KINDS = ("unpaired", "chat_unpaired")
# Tokenized as TRL's preference trainers do (data.preference): pairs and unpaired examples.
PREFERENCE_DATA_KINDS = PREFERENCE_KINDS + UNPAIRED_KINDS
# Rendered by a chat template.
CHAT_KINDS = ("conversational", "chat_preference", "chat_unpaired")
DATA_FORMATS = tuple(KINDS)
# What data.format may be set to: a source format, or "auto" to tell it from the data.
DATA_FORMAT_CHOICES = ("auto", *DATA_FORMATS)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system"}
HUMAN, ASSISTANT = "### Human:", "### Assistant:"
_MARKER = re.compile(r"### (Human|Assistant):")
# Fields each format needs, and (for columnar sources) the columns it reads.
REQUIRED = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "human_assistant": ("text",),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
    "chat_preference": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "chat_unpaired": ("prompt", "completion", "label"),
}
_SHOWN_PROBLEMS = 3


@dataclass(frozen=True)
class Row:
    """One example as read, before any check."""
    where: str  # "<file>, line 7" / "<file>, row 3": how an error names this example
    data: dict


def detect(first: Row) -> str:
    """The source format the keys of the first example say."""
    row = first.data
    if "chosen" in row and "rejected" in row:  # before `messages`: UltraFeedback has both
        return "chat_preference" if isinstance(row["chosen"], list) else "preference"
    if "label" in row and "completion" in row:  # before prompt_completion
        return "chat_unpaired" if isinstance(row["completion"], list) else "unpaired"
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    if "text" in row:
        text = row["text"]
        if isinstance(text, str) and HUMAN in text and ASSISTANT in text:
            return "human_assistant"
        return "text"
    raise UserError(f"{first.where}: cannot tell the data format from keys {sorted(row)}; "
                    "expected `messages` (chat), `conversations` (sharegpt), `instruction` + "
                    "`output` (alpaca), `prompt` + `completion`, `text`, `chosen` + `rejected` "
                    "(preference pairs), or `prompt` + `completion` + `label` (unpaired "
                    "preferences). Set it with "
                    f"--set data.format={'|'.join(DATA_FORMATS)}.")


def check_columns(label, columns: set[str], fmt: str, flag: str) -> None:
    """CSV, Parquet and datasets have columns: a missing one is one error, not one per row."""
    missing = [name for name in REQUIRED[fmt] if name not in columns]
    if missing:
        raise UserError(f"{flag} {label} (format {fmt}): no {_names(missing)} column"
                        f"{'s' if len(missing) > 1 else ''}; format {fmt} needs "
                        f"{_names(REQUIRED[fmt])}, and the columns are "
                        f"{', '.join(sorted(columns)) or '(none)'}.")


def canonicalize(label: str, columns: set[str] | None, rows: list[Row], format: str,
                 system_prompt: str | None, flag: str) -> tuple[str, str, tuple[dict, ...]]:
    """(source format, canonical kind, canonical rows) of `rows`, which are not empty;
    `format` "auto" tells it from the first row. Every row is checked: a UserError names
    the first few bad examples and counts the rest."""
    detected = detect(rows[0]) if format == "auto" else format
    if columns is not None:
        check_columns(label, columns, detected, flag)
    kind = KINDS[detected]
    if system_prompt and kind not in CHAT_KINDS:
        raise UserError(f"data.system_prompt is set, but {flag} {label} holds {detected} data, "
                        "not conversations; system prompts apply to chat data only (formats "
                        "messages, sharegpt, alpaca, human_assistant, chat_preference, chat_unpaired). Remove "
                        "data.system_prompt or convert the data to chat messages.")
    convert = _CONVERTERS[detected]
    checked, problems, count = [], [], 0
    for row in rows:
        try:
            canonical = convert(row.data)
        except _Problem as problem:
            count += 1
            if len(problems) <= _SHOWN_PROBLEMS:
                problems.append(f"{row.where} (format {detected}): {problem}")
            continue
        turns = canonical.get("messages", canonical.get("prompt"))
        if system_prompt and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": system_prompt})
        checked.append(canonical)
    if count:
        raise UserError(_report(problems, count, format == "auto"))
    return detected, kind, tuple(checked)


def _report(problems: list[str], count: int, detected: bool) -> str:
    message = problems[0] + "."
    if count > 1:
        more = "; ".join(problems[1:_SHOWN_PROBLEMS + 1])
        rest = count - 1 - len(problems[1:_SHOWN_PROBLEMS + 1])
        message += (f" {count - 1} more example{'s' if count > 2 else ''} "
                    f"{'have' if count > 2 else 'has'} problems: {more}"
                    + (f"; and {rest} more" if rest else "") + ".")
    if detected:
        message += (" The format was told from the first example; set another with "
                    "--set data.format=NAME if that guess is wrong.")
    return message


class _Problem(Exception):
    """What is wrong with one example; canonicalize adds where it is."""


def _names(fields) -> str:
    return ", ".join(f"`{name}`" for name in fields)


def _missing(row: dict, fmt: str) -> None:
    missing = [name for name in REQUIRED[fmt] if row.get(name) is None]
    if missing:
        raise _Problem(f"missing {_names(missing)}")


def _string(row: dict, key: str, nonempty: bool) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise _Problem(f"`{key}` must be a string, not {type(value).__name__}")
    if nonempty and not value.strip():
        raise _Problem(f"`{key}` is empty, so there is nothing to train on")
    return value


def _chat(turns: list[dict], field: str) -> dict:
    if not any(t["role"] == "assistant" for t in turns):
        raise _Problem(f"no assistant message in `{field}`, so nothing to train on")
    for number, turn in enumerate(turns, start=1):
        if turn["role"] == "assistant" and not turn["content"].strip():
            raise _Problem(f"assistant message {number} in `{field}` is empty")
    return {"messages": turns}


def _messages(row: dict) -> dict:
    _missing(row, "messages")
    return _chat(_turns(row["messages"], "messages", "role", "content",
                        {role: role for role in ROLES}), "messages")


def _sharegpt(row: dict) -> dict:
    _missing(row, "sharegpt")
    return _chat(_turns(row["conversations"], "conversations", "from", "value",
                        SHAREGPT_ROLES, fold_case=True), "conversations")


def _turns(items, field: str, speaker_key: str, text_key: str, roles: dict,
           fold_case: bool = False) -> list[dict]:
    """A list of {speaker, text} objects as {role, content} turns, checked."""
    if not isinstance(items, list) or not items:
        raise _Problem(f"`{field}` must be a non-empty list of {{{speaker_key}, {text_key}}} "
                       "objects")
    turns = []
    for item in items:
        if not isinstance(item, dict) or speaker_key not in item or text_key not in item:
            raise _Problem(f"every entry of `{field}` needs `{speaker_key}` and `{text_key}`")
        speaker = item[speaker_key]
        if isinstance(speaker, str) and fold_case:
            speaker = speaker.lower()
        role = roles.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise _Problem(f"`{speaker_key}` {item[speaker_key]!r} is not one of "
                           f"{', '.join(roles)}")
        if not isinstance(item[text_key], str):
            raise _Problem(f"`{text_key}` must be a string")
        turns.append({"role": role, "content": item[text_key]})
    return turns


def _alpaca(row: dict) -> dict:
    _missing(row, "alpaca")
    instruction = _string(row, "instruction", nonempty=False)
    output = _string(row, "output", nonempty=True)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise _Problem(f"`input` must be a string, not {type(extra).__name__}")
    parts = [part for part in (instruction, extra) if part and part.strip()]
    if not parts:
        raise _Problem("`instruction` and `input` are both empty, so there is no prompt")
    user = "\n\n".join(parts)
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": output}]}


def _prompt_completion(row: dict) -> dict:
    _missing(row, "prompt_completion")
    return {"prompt": _string(row, "prompt", nonempty=False),
            "completion": _string(row, "completion", nonempty=True)}


def _human_assistant(row: dict) -> dict:
    _missing(row, "human_assistant")
    text = _string(row, "text", nonempty=True)
    parts = _MARKER.split(text)  # [before, speaker, content, speaker, content, ...]
    if len(parts) < 3:
        raise _Problem(f"`text` has no `{HUMAN}` / `{ASSISTANT}` turns")
    if parts[0].strip():
        raise _Problem(f"`text` has text before its first `{HUMAN}` or `{ASSISTANT}` marker")
    turns = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        if role == "user" and not content.strip():
            raise _Problem(f"`text` has an empty `{HUMAN}` turn")
        turns.append({"role": role, "content": content.strip()})
    return _chat(turns, "text")


def _text(row: dict) -> dict:
    _missing(row, "text")
    return {"text": _string(row, "text", nonempty=True)}


def _preference(row: dict) -> dict:
    _missing(row, "preference")
    return _distinct({"prompt": _string(row, "prompt", nonempty=False),
                      "chosen": _string(row, "chosen", nonempty=True),
                      "rejected": _string(row, "rejected", nonempty=True)})


def _chat_preference(row: dict) -> dict:
    """Explicit prompt, or TRL's implicit one: the turns `chosen` and `rejected` share
    (trl.data_utils.extract_prompt), so the canonical row always names its prompt."""
    _missing(row, "chat_preference")
    roles = {role: role for role in ROLES}
    chosen = _turns(row["chosen"], "chosen", "role", "content", roles)
    rejected = _turns(row["rejected"], "rejected", "role", "content", roles)
    _distinct({"chosen": chosen, "rejected": rejected})
    if row.get("prompt") is None:
        shared = 0
        while (shared < min(len(chosen), len(rejected))
               and chosen[shared] == rejected[shared]):
            shared += 1
        if shared == 0:
            raise _Problem("`chosen` and `rejected` share no first turn, so the prompt cannot "
                           "be told from them; give it as `prompt`")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        prompt = _turns(row["prompt"], "prompt", "role", "content", roles)
    _answer_after(prompt, {"chosen": chosen, "rejected": rejected})
    return _distinct({"prompt": prompt, "chosen": chosen, "rejected": rejected})


def _label(row: dict) -> bool:
    value = row["label"]
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"  # a CSV cell
    if not isinstance(value, bool):
        raise _Problem(f"`label` must be true (a desirable completion) or false (an "
                       f"undesirable one), not {value!r}")
    return value


def _unpaired(row: dict) -> dict:
    _missing(row, "unpaired")
    return {"prompt": _string(row, "prompt", nonempty=False),
            "completion": _string(row, "completion", nonempty=True), "label": _label(row)}


def _chat_unpaired(row: dict) -> dict:
    _missing(row, "chat_unpaired")
    roles = {role: role for role in ROLES}
    prompt = _turns(row["prompt"], "prompt", "role", "content", roles)
    completion = _turns(row["completion"], "completion", "role", "content", roles)
    _answer_after(prompt, {"completion": completion})
    return {"prompt": prompt, "completion": completion, "label": _label(row)}


def _answer_after(prompt: list[dict], answers: dict) -> None:
    """The prompt ends where an answer starts, and each answer starts with one."""
    if prompt[-1]["role"] == "assistant":
        raise _Problem("the prompt ends with an assistant turn; it must end where the answer "
                       "starts (a user turn)")
    for name, turns in answers.items():
        if not turns:
            raise _Problem(f"`{name}` holds nothing after the prompt")
        if turns[0]["role"] != "assistant" or not turns[0]["content"].strip():
            raise _Problem(f"`{name}` must answer with a non-empty assistant turn")


# Pairs per block of unpair's output: datasets' map batch size, in which TRL's
# unpair_preference_dataset writes a block's chosen completions, then its rejected ones.
UNPAIR_BLOCK = 1000


def unpair(kind: str, rows) -> tuple[str, tuple[dict, ...]]:
    """Preference pairs as KTO's unpaired examples, as TRL's unpair_preference_dataset
    makes them and in its order: each pair's chosen completion desirable, its rejected one
    undesirable, a block's chosen ones before its rejected ones."""
    assert kind in PREFERENCE_KINDS, kind
    rows, out = list(rows), []
    for start in range(0, len(rows), UNPAIR_BLOCK):
        block = rows[start:start + UNPAIR_BLOCK]
        for answer, label in (("chosen", True), ("rejected", False)):
            out += [{"prompt": row["prompt"], "completion": row[answer], "label": label}
                    for row in block]
    return ("chat_unpaired" if kind == "chat_preference" else "unpaired"), tuple(out)


def _distinct(pair: dict) -> dict:
    if pair["chosen"] == pair["rejected"]:
        raise _Problem("`chosen` and `rejected` are the same, so the pair prefers nothing")
    return pair


_CONVERTERS = {
    "messages": _messages,
    "sharegpt": _sharegpt,
    "alpaca": _alpaca,
    "prompt_completion": _prompt_completion,
    "human_assistant": _human_assistant,
    "text": _text,
    "preference": _preference,
    "chat_preference": _chat_preference,
    "unpaired": _unpaired,
    "chat_unpaired": _chat_unpaired,
}
