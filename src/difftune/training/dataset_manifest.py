"""What a run trained on, kept in its directory so a resume can say when the dataset changed.

A resume continues the saved data order (data/dataset.py: a pure function of the records, seed and
epoch), so images added, removed, edited or re-weighted since the run began make the continued run
another training than the uninterrupted one would have been, and move its epoch count. That may be
what the user wants (more images for the rest of the run), so it is not an error; but it must not be
silent: `changes` names what changed, and the trainer prints it with its other notes.
"""

from __future__ import annotations

import json
from pathlib import Path

from difftune.data.records import ImageRecord

MANIFEST = "dataset.json"
EXAMPLES = 3
"""Paths named per kind of change."""


def manifest(train: list[ImageRecord], val: list[ImageRecord]) -> dict[str, dict[str, list]]:
    """{split: {path: [repeats, is_reg, width, height, size in bytes]}}: no file is read again, and a file
    only touched (a copy, a backup restore) is not a change."""

    def entry(r: ImageRecord) -> list:
        return [r.repeats, r.is_reg, *r.size, r.path.stat().st_size]

    return {"train": {str(r.path): entry(r) for r in train}, "val": {str(r.path): entry(r) for r in val}}


def write_manifest(root: Path, train: list[ImageRecord], val: list[ImageRecord]) -> None:
    from difftune.checkpoint.atomic import atomic_write_json

    atomic_write_json(Path(root) / MANIFEST, manifest(train, val))


def changes(root: Path, train: list[ImageRecord], val: list[ImageRecord]) -> str | None:
    """A note naming what changed in the dataset since the run in `root` last started, or None (unchanged, or
    a run from before difftune kept a manifest)."""
    try:
        saved = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    now = manifest(train, val)
    parts = []
    for split in ("train", "val"):
        before, after = saved.get(split, {}), now[split]
        added = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        edited = sorted(p for p in set(after) & set(before) if after[p][2:] != before[p][2:])
        weighted = sorted(p for p in set(after) & set(before) if after[p][:2] != before[p][:2])
        for what, paths in (("added", added), ("removed", removed), ("edited", edited),
                            ("with other repeats", weighted)):
            if paths:
                shown = ", ".join(Path(p).name for p in paths[:EXAMPLES]) + (", ..." if len(paths) > EXAMPLES else "")
                parts.append(f"{len(paths)} {split} image(s) {what} ({shown})")
    if not parts:
        return None
    return ("the dataset changed since this run last started: " + "; ".join(parts) + ". The resumed run trains on the "
            "dataset as it is now, so it is not the run it would have been, and its epochs are counted anew")
