"""Scan an image folder into records (image, caption, repeats), failing loudly on bad input.

Layout (kohya convention): images with same-name caption files; a subfolder named `N_name` repeats
its images N times. Every problem (unreadable image, missing caption, image format we do not train on,
a repeat folder without images or with N = 0) is collected and reported together before training
starts. Captions without an image and unknown files are reported as warnings, so nothing is skipped
silently (known sidecars such as latent caches are not). Symlinked subfolders are followed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from difftune.errors import DatasetError  # noqa: F401  (re-exported for callers)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp")
OTHER_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".psd", ".svg", ".jp2")
"""Image formats a user may drop in the folder that difftune does not train on: an error, not a skip."""
SIDECAR_EXTENSIONS = (".npz", ".json", ".toml", ".yaml", ".yml", ".md")
"""Files other tools keep beside images (latent caches, metadata, notes): ignored without a warning."""
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")




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


def walk_folder(root: Path) -> tuple[list[Path], list[Path]]:
    """(files, subfolders) under `root`, sorted, skipping hidden ones and following symlinked folders
    (each real folder once, so a link loop ends)."""
    files, folders, seen = [], [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        if Path(folder) != root:
            folders.append(Path(folder))
        files += [Path(folder) / n for n in names if not n.startswith(".")]
    return sorted(files), sorted(folders)


def scan_image_folder(
    root: str | Path,
    caption_extension: str = ".txt",
    repeats: int = 1,
    key: str = "data.train_dir",
    notes: list[str] | None = None,
) -> list[ImageRecord]:
    """All images under `root`, sorted by path, with their captions and repeat counts.

    `key` is the config key that named the folder, for the error message. Warnings about files that
    are not used (not images, captions without an image, empty captions) are appended to `notes`.

    Raises:
        DatasetError: if the folder is missing or empty, or any image is unreadable or lacks a caption.
    """
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "folder not found"
        raise DatasetError(
            f"{key} = '{root}' ({root.absolute()}): {what} (expected a folder of images with same-name captions)"
        )
    files, folders = walk_folder(root)
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise DatasetError(
            f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} in the folder and its subfolders)"
        )
    problems = [
        f"{p}: {p.suffix} images are not supported (convert it to one of {', '.join(IMAGE_EXTENSIONS)})"
        for p in files
        if p.suffix.lower() in OTHER_IMAGE_EXTENSIONS
    ]
    problems += _repeat_folder_problems(folders, images)
    if notes is not None:
        notes += _unused_file_notes(root, files, caption_extension)
    records, empty_captions = [], []
    for path in images:
        caption_path = path.with_suffix(caption_extension)
        problem, size = _check_image(path)
        if problem:
            problems.append(f"{path}: unreadable image ({problem})")
        if not caption_path.is_file():
            problems.append(f"{path}: missing caption file {caption_path.name}")
            continue
        try:
            caption = caption_path.read_text(encoding="utf-8-sig").strip()  # -sig: drop a BOM
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{caption_path}: unreadable caption ({e}; save it as UTF-8)")
            continue
        if not caption:
            empty_captions.append(caption_path)
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
    if empty_captions and notes is not None:
        notes.append(
            f"{len(empty_captions)} caption file(s) in {root} are empty, so those images train without a prompt; "
            f"e.g. {empty_captions[0]}"
        )
    return records


def _repeat_folder_problems(folders: list[Path], images: list[Path]) -> list[str]:
    """`N_name` folders with N = 0, or with no image anywhere below them (a typo'd extension, say)."""
    problems, with_images = [], {parent for p in images for parent in p.parents}
    for folder in folders:
        match = REPEAT_FOLDER.match(folder.name)
        if match and int(match.group(1)) == 0:
            problems.append(f"{folder}: repeat count 0 in '{folder.name}' (the N of N_name must be 1 or more)")
        elif match and folder not in with_images:
            problems.append(f"{folder}: no images in this repeat folder (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return problems


def _unused_file_notes(root: Path, files: list[Path], caption_extension: str) -> list[str]:
    """Warnings for files that are neither a used image nor its caption."""
    image_stems = {p.with_suffix("") for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
    known = IMAGE_EXTENSIONS + OTHER_IMAGE_EXTENSIONS + SIDECAR_EXTENSIONS
    orphans = [p for p in files if p.suffix == caption_extension and p.with_suffix("") not in image_stems]
    unknown = [p for p in files if p.suffix.lower() not in known and p.suffix != caption_extension]
    notes = []
    for what, paths in (("caption file(s) without an image", orphans), ("file(s) that are not images", unknown)):
        if paths:
            shown = ", ".join(str(p.relative_to(root)) for p in paths[:5]) + (", ..." if len(paths) > 5 else "")
            notes.append(f"{len(paths)} {what} in {root} are not used: {shown}")
    return notes


def _check_image(path: Path) -> tuple[str | None, tuple[int, int]]:
    """Decode the image fully (verify() misses truncated data); return (error text or None, size)."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.width < 1 or image.height < 1:
                return "empty image", (0, 0)
            return None, ImageOps.exif_transpose(image).size  # the size a viewer shows
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__, (0, 0)
