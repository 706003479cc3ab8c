"""The house rules of docs/ARCHITECTURE.md, read from the source's imports (ast), so the
flow detect -> plan -> data -> run -> launch -> worker -> export stays one direction.

Every import counts, also those inside functions: a lazy import is still an arrow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "launcher" / "ftlaunch"
STAGES = ("detect", "models", "plan", "data", "run", "launch", "worker", "export", "show")
SHARED = "shared"  # the modules at the package's top: errors, files, units, resources, ...

# What each stage may import besides itself and the shared modules. A stage missing from
# a row may not be imported by it. `cli` (the entry point) may import any stage but worker.
ALLOWED = {
    SHARED: set(),
    "detect": set(),
    "models": {"data.demo"},  # the tiny model's tokenizer is trained on the demo data
    "plan": {"detect", "models", "data.formats", "data.read"},  # recipes name the data formats; --objective auto peeks at the data
    "data": {"models"},
    "run": {"detect", "models", "data"},
    "show": {"detect", "models", "plan", "data", "run"},
    "export": {"models", "data", "run", "show"},
    "worker": {"models", "data", "run", "show.progress", "show.plot"},
    "launch": {"detect", "models", "plan", "data", "run", "show"},
}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(("ftlaunch", *parts))] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The ftlaunch modules `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: a relative import (write it absolute)"
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            # `from ftlaunch.data import demo` imports data.demo (and the package's
            # __init__, which imports nothing); `from ftlaunch.files import x` imports files.
            names = [m for m in submodules if m in MODULES] or [node.module]
        else:
            continue
        found.update(name for name in names if name in MODULES and name != "ftlaunch")
    return found


def _stage(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in STAGES:  # the stage's package counts as the stage
        return parts[1]
    return "cli" if parts[1:] in (["cli"], ["__main__"]) else SHARED


def _allowed(importer: str, imported: str) -> bool:
    mine, theirs = _stage(importer), _stage(imported)
    if theirs in (mine, SHARED):
        return True
    if mine == "cli":
        return theirs != "worker"
    short = imported.removeprefix("ftlaunch.")
    return any(short == rule or short.startswith(rule + ".") or theirs == rule
               for rule in ALLOWED[mine])


def test_every_module_is_in_a_stage_or_shared():
    assert set(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") \
        == set(STAGES)
    shared = sorted(m for m in MODULES if _stage(m) == SHARED)
    assert "ftlaunch.errors" in shared and not any(m.count(".") > 1 for m in shared)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_flow(module):
    wrong = sorted(i for i in _imports(MODULES[module]) if not _allowed(module, i))
    assert not wrong, (f"{module} ({_stage(module)}) may not import {wrong}; "
                       "docs/ARCHITECTURE.md says who may import whom")


def test_nothing_but_the_cli_imports_launch_or_worker():
    for module, path in MODULES.items():
        for imported in _imports(path):
            if _stage(imported) in ("launch", "worker") and _stage(module) != _stage(imported):
                assert _stage(module) == "cli" and _stage(imported) == "launch", (module, imported)


def test_the_worker_reaches_no_launcher_module():
    """Transitively: the worker's imports never lead to planning or launching code."""
    seen, todo = set(), [m for m in MODULES if _stage(m) == "worker"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_imports(MODULES[module]))
    reached = sorted(m for m in seen if _stage(m) in ("plan", "launch", "export", "cli"))
    assert not reached


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_400_lines(module):
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines"


def test_modules_are_named_in_strings_only_to_be_run():
    """A module path in a string (importlib, `python -m`) is an import the rules above do
    not see: the only one is the worker's, which the launcher starts as a process."""
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                named = node.value.split()[0] if node.value.split() else ""
                assert not (named.startswith("ftlaunch.") and named in MODULES
                            and named != "ftlaunch.worker.main"), (module, node.value)


def test_run_yaml_is_read_only_through_the_run_record():
    """Only run/record.py parses run.yaml: no other module (or bench script) that names
    the file imports a parser, so the others can only get the record's typed fields."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    for module, path in [*MODULES.items(), *((p.name, p) for p in bench.glob("*.py"))]:
        text = path.read_text(encoding="utf-8")
        names_it = "RUN_FILE" in text or '"run.yaml"' in text or "'run.yaml'" in text
        parses_yaml = any(isinstance(node, (ast.Import, ast.ImportFrom))
                          and "yaml" in ast.unparse(node).split()
                          for node in ast.walk(ast.parse(text)))
        assert module == "ftlaunch.run.record" or not (names_it and parses_yaml), module
