"""A save's manifest: every file's size and sha256, written last, checked before a resume trusts it.

A save folder is renamed into place only when complete, but a disk can still lose or truncate files
afterwards (a full disk during a later copy, a user deleting `training_state/`, a sync tool). The
manifest turns "this folder looks like a save" into "these exact bytes were written": a resume walks
the saves newest first and takes the first whose files all match.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
VERSION = 1


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path, step: int | None) -> int:
    """Record every file under `folder` (reading each back once); returns the total bytes."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"version": VERSION, "step": step, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return sum(f["bytes"] for f in files.values())


def read_manifest(folder: Path) -> dict:
    """The manifest of a save; ValueError (with the reason) when it is missing or unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ValueError(f"no {MANIFEST} (not a complete save, or one written before difftune kept manifests)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("it lists no files")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{MANIFEST} is unreadable ({e})") from None
    return manifest


def verify_save(folder: Path, hashes: bool = True) -> str | None:
    """Why `folder` is not the save its manifest describes, or None when every file matches."""
    try:
        manifest = read_manifest(folder)
    except ValueError as e:
        return str(e)
    for name, expected in manifest["files"].items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected.get("bytes"):
            return f"{name} has {size:,} bytes, the save wrote {expected.get('bytes'):,} (truncated or replaced)"
        if hashes and file_sha256(path) != expected.get("sha256"):
            return f"{name} differs from what was saved (sha256 mismatch)"
    return None


def save_bytes(folder: Path) -> int | None:
    """Total size a save's manifest records (None without a readable manifest)."""
    try:
        return sum(int(f.get("bytes", 0)) for f in read_manifest(folder)["files"].values())
    except ValueError:
        return None
