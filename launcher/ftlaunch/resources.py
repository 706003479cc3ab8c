"""Where the bundled data (recipes, model facts, accelerate templates) lives, and the
source checkout's constraints.txt.

In a built wheel, pyproject maps recipes/ and accelerate_configs/ inside the
`ftlaunch` package; in a source checkout (editable install) they stand beside
launcher/, two folders up from this package. One lookup serves both so nothing else
needs to know which it is.
"""

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE_DIR.parent.parent  # launcher/ftlaunch -> the repository


def _bundled(name: str) -> Path:
    for candidate in (_PACKAGE_DIR / name, _CHECKOUT / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"ftlaunch is installed without its {name}/ folder")


def recipes_dir() -> Path:
    return _bundled("recipes")


def accelerate_templates_dir() -> Path:
    return _bundled("accelerate_configs")


def demo_data_path() -> Path:
    return recipes_dir() / "data" / "demo-arithmetic.jsonl"


def demo_pairs_path() -> Path:
    """Preference pairs (correct vs wrong answers) for the demo's DPO step."""
    return recipes_dir() / "data" / "demo-preference.jsonl"


def constraints_path() -> Path | None:
    """The repository's constraints.txt (the known-good pins), in a source checkout only:
    there this package is launcher/ftlaunch beside it. None in an installed wheel, whose
    parent folder is site-packages: no file there is ours."""
    path = _CHECKOUT / "constraints.txt"
    return path if _PACKAGE_DIR.parent.name == "launcher" and path.is_file() else None
