"""`ftlaunch recipes`: the bundled training recipes and model presets, one line each."""

from __future__ import annotations

from collections.abc import Iterator

from ftlaunch.models import presets as models
from ftlaunch.plan import recipe as recipes


def catalog_lines() -> Iterator[str]:
    """The lines `ftlaunch recipes` prints, as each recipe and preset is read."""
    yield "Training recipes (--recipe NAME):"
    for name in recipes.recipe_paths():
        yield f"  {name:<14} {recipes.load_recipe(name).description}"
    yield "\nModel presets (--model NAME):"
    for name, entry in models.load_presets().items():
        spec = models.resolve(name)
        aliases = ", ".join(entry.get("aliases") or [])
        yield (f"  {name:<14} {spec.parameters / 1e9:7.3f}B  {entry['id']}"
               + (f"  (also: {aliases})" if aliases else ""))
