"""Model facts: the presets (recipes/models.yaml) and the builtin models built without a download."""
