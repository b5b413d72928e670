"""Atomic writes: a reader (or a crash) never sees a half-written file or checkpoint folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".tmp-"
"""Every temporary file and folder starts with this; what a killed process leaves is removed on the next
start (checkpoint.state.clean_leftovers)."""
OLD_PREFIX = ".old-"
"""The previous copy of a folder being replaced, between the two renames of atomic_directory."""


def _usual_mode(directory: bool) -> int:
    """The permissions a plain open()/mkdir() would give (mkstemp/mkdtemp make private 0600/0700
    files, which a UI running as another user could not read)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _usual_modes(root: Path) -> None:
    """Give every file and folder under `root` the usual permissions. Some writers make private files:
    safetensors >= 0.5 writes through its own temporary file (mode 0600) and renames it over ours."""
    file_mode, dir_mode = _usual_mode(directory=False), _usual_mode(directory=True)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), dir_mode)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)


@contextmanager
def atomic_directory(final: Path):
    """Yield a temporary sibling folder; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{final.name}-", dir=final.parent))
    os.chmod(tmp, _usual_mode(directory=True))
    try:
        yield tmp
        _usual_modes(tmp)
        if final.exists():
            # Re-saving the same step (after a resume): move the old copy aside first, then drop it.
            old = final.with_name(f"{OLD_PREFIX}{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}-", dir=path.parent)
    os.chmod(tmp, _usual_mode(directory=False))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@contextmanager
def atomic_path(final: Path):
    """Yield a temporary sibling path for a writer that takes a file name (e.g. safetensors'
    `save_file`); on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{final.name}-", dir=final.parent)
    os.close(fd)
    os.chmod(tmp, _usual_mode(directory=False))
    try:
        yield Path(tmp)
        os.chmod(tmp, _usual_mode(directory=False))  # the writer may have replaced our file with its own
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_tree(path: Path) -> None:
    """Delete a folder so that an interruption never leaves half of it looking like a whole one: it is
    renamed to a temporary name first (the next start removes what is left of it)."""
    path = Path(path)
    if not path.exists():
        return
    doomed = path.with_name(f"{TEMP_PREFIX}removing-{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
