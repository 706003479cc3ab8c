"""SHA-256 of files, read in blocks: data fingerprints, checkpoint manifests, adapter digests."""

from __future__ import annotations

import hashlib
from pathlib import Path


def update_with_file(digest, path: Path):
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def file_sha256(path: Path) -> str:
    return update_with_file(hashlib.sha256(), path).hexdigest()
