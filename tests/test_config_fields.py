"""The shipped SFTConfig / LoraConfig field table against the installed libraries."""

import enum
import json
import subprocess
import sys
import typing

import pytest

from ftlaunch.plan import config_fields


def test_shipped_table_is_what_the_installed_libraries_say():
    shipped = json.loads(config_fields.table_path().read_text(encoding="utf-8"))
    assert shipped["versions"] == config_fields.installed_versions(), (
        "recipes/config_fields.json was made for other library versions; regenerate it: "
        "python -c 'from ftlaunch.plan import config_fields; config_fields.write_table()'")
    assert shipped["fields"] == config_fields.introspect()


def test_the_launcher_validates_a_recipe_without_importing_the_training_stack():
    code = ("import sys; from ftlaunch.plan import recipe as recipes; "
            "r = recipes.validate(recipes.apply_overrides(recipes.load_recipe('default'), "
            "['learning_rate=1e-4', 'lora.r=8'])); "
            "assert r.training['learning_rate'] == 1e-4 and r.lora['r'] == 8; "
            "print(sorted(m for m in ('torch', 'trl', 'peft', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_other_library_versions_are_asked_directly(monkeypatch, tmp_path):
    stale = tmp_path / "config_fields.json"
    stale.write_text(json.dumps({"versions": {"trl": "0.0.1"}, "fields": {"training": {}}}))
    monkeypatch.setattr(config_fields, "table_path", lambda: stale)
    monkeypatch.setattr(config_fields, "_cache", {})
    assert config_fields.fields("training")["learning_rate"] == "float"


class _Mode(str, enum.Enum):
    A = "a"
    B = "b"


@pytest.mark.parametrize("annotation, value, expected", [
    (float, "1e-4", 1e-4),
    (float, 3, 3.0),
    (int | None, 5, 5),
    (int | None, None, None),
    (float | str, "5", 5.0),
    (int | float, 5, 5),  # stays an int where an int is allowed
    (bool, True, True),
    (typing.Literal["x", "y"], "y", "y"),
    (_Mode, "b", "b"),
    (list[str], ("q", "v"), ["q", "v"]),
    (typing.Optional[dict], {"a": 1}, {"a": 1}),
    (typing.Callable, print, print),
])
def test_coerce_accepts(annotation, value, expected):
    assert config_fields.coerce(value, config_fields.describe(annotation)) == expected


@pytest.mark.parametrize("annotation, value", [
    (float, "abc"),
    (float, True),
    (int, True),  # a flag is not a number
    (int, 2.5),
    (bool, "yes"),
    (typing.Literal[1, 2], True),
    (typing.Literal["x", "y"], "z"),
    (_Mode, 3),
    (list[str], "q"),
    (int | None, "x"),
])
def test_coerce_refuses(annotation, value):
    with pytest.raises((TypeError, ValueError)):
        config_fields.coerce(value, config_fields.describe(annotation))


def test_type_names_read_like_python():
    assert config_fields.type_name(config_fields.describe(int | None)) == "int | None"
    assert config_fields.type_name(config_fields.describe(typing.Literal["x", "y"])) == "one of 'x', 'y'"
