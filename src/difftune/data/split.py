"""Deterministic train/validation split, made once from `validation.seed`.

Each image gets a score from a hash of (seed, path relative to the dataset root); the lowest scores
form the validation set. The split depends only on the file names and the seed, not on the training
seed, the file system's listing order or the number of images added elsewhere.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from difftune.data.records import ImageRecord


def _score(seed: int, relative: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{relative}".encode()).digest()[:8], "big")


def split_records(
    records: list[ImageRecord], root: str | Path, val_split: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Return (train, validation). With val_split > 0 at least one image is held out, and at least
    one stays for training."""
    if val_split <= 0 or len(records) < 2:
        return list(records), []
    count = min(len(records) - 1, max(1, math.floor(len(records) * val_split + 0.5)))
    root = Path(root)
    ranked = sorted(records, key=lambda r: _score(seed, r.path.relative_to(root).as_posix()))
    val_keys = {r.key for r in ranked[:count]}
    train = [r for r in records if r.key not in val_keys]
    val = [r for r in records if r.key in val_keys]
    return train, val
