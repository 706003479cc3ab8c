"""The fields of TRL's SFTConfig, DPOConfig and KTOConfig and peft's LoraConfig, and their
value types.

Importing trl and peft to look at two dataclasses costs the launcher ~3.5 s
(peft pulls in transformers, torch and bitsandbytes), longer than planning,
tokenizing and writing the run files together. So the table is shipped
(recipes/config_fields.json) for the library versions it was made from and
read in a millisecond; with other installed versions the libraries are asked
instead, which is always right, only slower. tests/test_config_fields.py
checks that the shipped table is what the installed libraries say.

A type is described as JSON: "any", "none", "bool", "int", "float", "str",
"list", "dict", {"union": [...]} or {"literal": [...]}.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from ftlaunch.plan.objectives import OBJECTIVES
from ftlaunch.resources import recipes_dir

LIBRARIES = ("trl", "peft", "transformers")  # SFTConfig extends transformers' TrainingArguments
# peft's LoraConfig, then each objective's TRL config (plan.objectives).
SECTIONS = ("lora", *(objective.fields for objective in OBJECTIVES.values()))


def table_path() -> Path:
    return recipes_dir() / "config_fields.json"


def installed_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in LIBRARIES}


def fields(section: str) -> dict[str, object]:
    """{field name: type description} of the section's dataclass."""
    return _tables()[section]


_cache: dict = {}


def _tables() -> dict:
    if not _cache:
        try:
            shipped = json.loads(table_path().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            shipped = {}
        if shipped.get("versions") == installed_versions():
            _cache.update(shipped["fields"])
        else:
            _cache.update(introspect())
    return _cache


def introspect() -> dict:
    """The table, from the installed libraries themselves."""
    import dataclasses
    import typing

    from peft import LoraConfig
    import trl

    classes = [LoraConfig, *(getattr(trl, objective.config) for objective in OBJECTIVES.values())]
    out = {}
    for section, cls in zip(SECTIONS, classes):
        hints = typing.get_type_hints(cls)
        out[section] = {f.name: describe(hints.get(f.name, typing.Any))
                        for f in dataclasses.fields(cls) if f.init}
    return out


def write_table(path: Path | None = None) -> Path:
    """Regenerate the shipped table after a library upgrade."""
    path = path or table_path()
    table = {"versions": installed_versions(), "fields": introspect()}
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def describe(annotation) -> object:
    import enum
    import types
    import typing

    if annotation is typing.Any:
        return "any"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        # Sorted: typing caches unions regardless of order, so the order of the arguments
        # depends on which equal union was built first in the process.
        options = {json.dumps(describe(a), sort_keys=True) for a in typing.get_args(annotation)}
        return {"union": [json.loads(o) for o in sorted(options)]}
    if origin is typing.Literal:
        return {"literal": list(typing.get_args(annotation))}
    if origin in (list, tuple) or annotation in (list, tuple):
        return "list"
    if origin is dict or annotation is dict:
        return "dict"
    if annotation is type(None):
        return "none"
    for kind in (bool, int, float, str):
        if annotation is kind:
            return kind.__name__
    if isinstance(annotation, type) and issubclass(annotation, str) and issubclass(annotation, enum.Enum):
        # A str enum by its value type: peft adds members at run time (register_peft_method),
        # so the member list depends on what was imported; the library checks the value.
        return "str"
    return "any"  # a callable, a class, another enum: the library checks it


def coerce(value, kind):
    """value converted to the described type, or TypeError/ValueError.

    YAML and --set give strings for some numbers (1e-4); SFTConfig wants a float.
    """
    if kind == "any":
        return value
    if isinstance(kind, dict):
        if "union" in kind:
            # The stricter types first, so "5" stays an int where int is allowed.
            options = sorted(kind["union"], key=lambda t: 0 if t in ("none", "bool", "int") else 1)
            for option in options:
                try:
                    return coerce(value, option)
                except (TypeError, ValueError):
                    continue
            raise TypeError(kind)
        allowed = kind["literal"]
        # True == 1 in Python; a flag is not a number here.
        if any(v == value and isinstance(v, bool) == isinstance(value, bool) for v in allowed):
            return value
        raise ValueError(value)
    if kind == "float":
        if isinstance(value, bool):
            raise TypeError(kind)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)  # ValueError for words
        raise TypeError(kind)
    python_type = {"none": type(None), "bool": bool, "int": int, "str": str,
                   "list": (list, tuple), "dict": dict}[kind]
    if isinstance(value, python_type) and not (kind == "int" and isinstance(value, bool)):
        return list(value) if kind == "list" else value
    raise TypeError(kind)


def type_name(kind) -> str:
    if isinstance(kind, dict):
        if "union" in kind:
            return " | ".join(type_name(k) for k in kind["union"])
        return "one of " + ", ".join(repr(v) for v in kind["literal"])
    return {"none": "None", "any": "anything"}.get(kind, kind)
