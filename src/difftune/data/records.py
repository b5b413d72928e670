"""Scan an image folder into records (image, caption, repeats), failing loudly on bad input.

Layout (kohya convention): images with same-name caption files; a subfolder named `N_name` repeats
its images N times. Every problem (unreadable image, missing caption, empty folder) is collected and
reported together before training starts; nothing is skipped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


class DatasetError(ValueError):
    """The dataset has problems; the message lists every offending file."""


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str
    repeats: int
    folder: str
    """Path of the image's folder relative to the dataset root ('.' for the root)."""
    size: tuple[int, int] = (0, 0)
    """(width, height) in pixels, read while checking the image."""

    @property
    def key(self) -> str:
        """Stable identity used for deterministic splits and ordering."""
        return self.path.as_posix()


def folder_repeats(relative_folder: Path) -> int:
    """Product of the N_ prefixes of every folder on the way (kohya applies the innermost one)."""
    repeats = 1
    for part in relative_folder.parts:
        match = REPEAT_FOLDER.match(part)
        if match:
            repeats = int(match.group(1))
    return repeats


def scan_image_folder(
    root: str | Path, caption_extension: str = ".txt", repeats: int = 1, key: str = "data.train_dir"
) -> list[ImageRecord]:
    """All images under `root`, sorted by path, with their captions and repeat counts.

    `key` is the config key that named the folder, for the error message.

    Raises:
        DatasetError: if the folder is missing or empty, or any image is unreadable or lacks a caption.
    """
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "folder not found"
        raise DatasetError(f"{key} = '{root}': {what} (expected a folder of images with same-name captions)")
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DatasetError(
            f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} in the folder and its subfolders)"
        )
    records, problems = [], []
    for path in images:
        caption_path = path.with_suffix(caption_extension)
        problem, size = _check_image(path)
        if problem:
            problems.append(f"{path}: unreadable image ({problem})")
        if not caption_path.is_file():
            problems.append(f"{path}: missing caption file {caption_path.name}")
            continue
        try:
            caption = caption_path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{caption_path}: unreadable caption ({e})")
            continue
        relative_folder = path.parent.relative_to(root)
        records.append(
            ImageRecord(
                path=path,
                caption=" ".join(caption.split()),
                repeats=folder_repeats(relative_folder) * repeats,
                folder=relative_folder.as_posix(),
                size=size,
            )
        )
    if problems:
        listing = "\n  ".join(problems)
        raise DatasetError(f"{root}: {len(problems)} problem(s) in the dataset; fix or remove these files:\n  {listing}")
    return records


def _check_image(path: Path) -> tuple[str | None, tuple[int, int]]:
    """Decode the image fully (verify() misses truncated data); return (error text or None, size)."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.width < 1 or image.height < 1:
                return "empty image", (0, 0)
            return None, image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__, (0, 0)
