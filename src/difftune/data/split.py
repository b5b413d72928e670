"""Deterministic train/validation split, made once from `validation.seed`.

Each image gets a score from a hash of (seed, its folder and file name: the path relative to
data.train_dir, or for a subset its dir as written plus the path inside it); the lowest scores form the
validation set. The split depends only on those names and the seed, not on the training seed, the
file system's listing order or the number of images added elsewhere.

With several folders ([[data.subsets]]) the split is over their union, as EveryDream2 does (kohya
splits each subset): a folder of a few images then may hold out none, and none is emptied by the
at-least-one rule. Regularisation images (data.reg_dir, is_reg subsets) are never held out and do not
count toward val_split, as in kohya: the validation loss measures the training images only.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from difftune.data.records import ImageRecord


def _score(seed: int, relative: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{relative}".encode()).digest()[:8], "big")


def split_records(
    records: list[ImageRecord], root: str | Path | None, val_split: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Return (train, validation), each in the order of `records`. With val_split > 0 at least one
    training image is held out, and at least one stays for training; every reg image stays in train.

    `root` is not needed any more (a record's folder is its path relative to its root); it is accepted
    so callers written for one folder keep working.
    """
    candidates = [r for r in records if not r.is_reg]
    if val_split <= 0 or len(candidates) < 2:
        return list(records), []
    count = min(len(candidates) - 1, max(1, math.floor(len(candidates) * val_split + 0.5)))
    ranked = sorted(candidates, key=lambda r: (_score(seed, (Path(r.folder) / r.path.name).as_posix()), r.key))
    val_keys = {r.key for r in ranked[:count]}
    train = [r for r in records if r.key not in val_keys]
    val = [r for r in records if r.key in val_keys]
    return train, val
