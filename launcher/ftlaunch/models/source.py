"""Where a run's model comes from: what the launcher resolved and the workers, the data
cache and export load (run.yaml's `model` section). No torch here: the planner's side
imports it too."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSource:
    name: str  # the preset name, or the id/path the user gave
    source: str  # the preset's source: a hub id, a local folder, or builtin:NAME
    load_from: str  # the folder or hub id the weights load from
    tokenizer: str  # the folder or hub id the tokenizer loads from
    random_init: bool = False  # built from `config` with random weights (--random-init)
    trust_remote_code: bool = False
    config: dict | None = dataclasses.field(default=None, hash=False)  # the HF config, for random init

    @property
    def is_local(self) -> bool:
        """Nothing to download: the weights are on this disk, or built from the config."""
        return self.random_init or Path(self.load_from).exists()

    @property
    def is_builtin(self) -> bool:
        return self.source.startswith("builtin:")

    def with_tokenizer(self, tokenizer: str | Path) -> "ModelSource":
        """The same model with its tokenizer from elsewhere (a finished run's adapter/)."""
        return dataclasses.replace(self, tokenizer=str(tokenizer))

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        if data["config"] is None:
            del data["config"]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "ModelSource":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})
