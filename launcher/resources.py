"""Where the bundled data (recipes, model facts, accelerate templates) lives.

In a built wheel, pyproject maps recipes/ and accelerate_configs/ inside the
`ftlaunch` package; in a source checkout (editable install) they stand beside
launcher/. One lookup serves both so nothing else needs to know which it is.
"""

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def _bundled(name: str) -> Path:
    for candidate in (_PACKAGE_DIR / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"ftlaunch is installed without its {name}/ folder")


def recipes_dir() -> Path:
    return _bundled("recipes")


def accelerate_templates_dir() -> Path:
    return _bundled("accelerate_configs")


def demo_data_path() -> Path:
    return recipes_dir() / "data" / "demo-arithmetic.jsonl"
