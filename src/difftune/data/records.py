"""Scan image folders into records (image, caption, repeats, options), failing loudly on bad input.

Layout (kohya convention): images with same-name caption files; a subfolder named `N_name` repeats
its images N times. A `multiply.txt` holding a number (EveryDream2) sets the repeats of the images in
its own folder instead (not of its subfolders, as in EveryDream2; a fraction such as 0.5 or 1.5 is
drawn per epoch, see data/epoch.py). Every problem (unreadable image, missing caption, image format we
do not train on, a repeat folder without images or with N = 0, a missing mask) is collected and
reported together before training starts. Captions without an image and unknown files are reported as
warnings, so nothing is skipped silently (known sidecars such as latent caches are not). Symlinked
subfolders are followed.

A missing caption file is an error, except: a regularisation image under an `N_class` folder takes
the class as its caption (kohya's class tokens); with data.caption_from_filename the file name is the
caption (EveryDream2's rule, `caption_from_filename`).

`scan_dataset` reads every folder of a DataConfig (data.train_dir, data.reg_dir, [[data.subsets]]).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

from difftune.errors import DatasetError  # noqa: F401  (re-exported for callers)

if TYPE_CHECKING:
    from difftune.config.schema import DataConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp")
OTHER_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".psd", ".svg", ".jp2")
"""Image formats a user may drop in the folder that difftune does not train on: an error, not a skip."""
SIDECAR_EXTENSIONS = (".npz", ".json", ".toml", ".yaml", ".yml", ".md")
"""Files other tools keep beside images (latent caches, metadata, notes): ignored without a warning."""
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
MULTIPLY_FILE = "multiply.txt"
"""EveryDream2's per-folder repeat count."""
COPY_NUMBER = re.compile(r"\s*\(\d+\)$")
"""The ' (2)' a file manager appends to a copied or batch-renamed file."""


@dataclass(frozen=True)
class SubsetOptions:
    """Per-folder overrides of the DataConfig augmentation settings ([[data.subsets]]); None = use the
    DataConfig value. The dataset reads them through `record.options`."""

    flip_p: float | None = None
    cond_dropout: float | None = None
    shuffle_tags: bool | None = None
    keep_tokens: int | None = None


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str
    repeats: float
    """Times the image is used per epoch: an int from N_ folders, a float from a subset's repeats or
    multiply.txt (the fraction is drawn per epoch, see data/epoch.py)."""
    folder: str
    """The image's folder relative to data.train_dir ('.' for the root); for data.reg_dir and a subset,
    that folder's dir as written in the config joined with the relative folder ('reg/1_person')."""
    size: tuple[int, int] = (0, 0)
    """(width, height) in pixels, read while checking the image."""
    is_reg: bool = False
    """A regularisation (prior-preservation) image: never validated, balanced per epoch, loss scaled by
    train.prior_loss_weight."""
    mask_path: Path | None = None
    """The same-name grey mask image under data.mask_dir, found at scan time."""
    options: SubsetOptions | None = None
    """The subset's own augmentation settings; None: the DataConfig values."""

    @property
    def key(self) -> str:
        """Stable identity used for deterministic splits and ordering."""
        return self.path.as_posix()


def folder_repeats(relative_folder: Path) -> int:
    """The N of the innermost N_ folder on the way (kohya's rule); 1 without one."""
    repeats = 1
    for part in relative_folder.parts:
        match = REPEAT_FOLDER.match(part)
        if match:
            repeats = int(match.group(1))
    return repeats


def folder_class(relative_folder: Path) -> str | None:
    """The name of the innermost N_name folder on the way (kohya's class tokens), if any."""
    names = [m.group(2) for m in map(REPEAT_FOLDER.match, relative_folder.parts) if m]
    return names[-1] if names else None


def caption_from_filename(path: Path) -> str:
    """EveryDream2's caption of an image without a caption file: the file name without extension up to
    the first '_' ('a red box_03.png' -> 'a red box'), also without a trailing copy number
    ('a red box (2).png' -> 'a red box')."""
    return " ".join(COPY_NUMBER.sub("", path.stem.split("_")[0]).split())


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
    repeats: float = 1,
    key: str = "data.train_dir",
    notes: list[str] | None = None,
    *,
    label: str | None = None,
    is_reg: bool = False,
    options: SubsetOptions | None = None,
    mask_dir: str | Path | None = None,
    mask_key: str = "data.mask_dir",
    captions_from_filenames: bool = False,
) -> list[ImageRecord]:
    """All images under `root`, sorted by path, with their captions and repeat counts.

    `key` is the config key that named the folder, for the error message. Warnings about files that
    are not used (not images, captions without an image, empty captions) are appended to `notes`.
    `label` (a subset's dir as written) is put in front of each record's folder. With `mask_dir`, each
    image's mask is the same-name image (any image extension) at the same relative path there.

    Raises:
        DatasetError: if the folder is missing or empty, or any image is unreadable or lacks a caption
        or a mask.
    """
    root = Path(root)
    _require_folder(root, key, "a folder of images with same-name captions")
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
    multipliers = _read_multipliers(root, files, is_reg, problems)
    masks = _mask_index(Path(mask_dir), mask_key, root, key) if mask_dir is not None else None
    if notes is not None:
        notes += _unused_file_notes(root, files, caption_extension)
        notes += _folder_notes(root, key, folders, images)
    records, empty_captions, missing_captions, black_masks = [], [], 0, []
    for path in images:
        problem, size, _ = _check_image(path)
        if problem:
            problems.append(f"{path}: unreadable image ({problem})")
        relative_folder = path.parent.relative_to(root)
        caption = _read_caption(path, caption_extension, folder_class(relative_folder) if is_reg else None,
                                captions_from_filenames, problems)
        mask_path = (_find_mask(path, root, size, masks, mask_dir, mask_key, problems, black_masks)
                     if masks is not None else None)
        if caption is None:
            missing_captions += 1
            continue
        if not caption:
            empty_captions.append(path.with_suffix(caption_extension))
        records.append(
            ImageRecord(
                path=path,
                caption=" ".join(caption.split()),
                repeats=_whole_if_whole(multipliers.get(path.parent, folder_repeats(relative_folder)) * repeats),
                folder=(Path(label) / relative_folder if label else relative_folder).as_posix(),
                size=size,
                is_reg=is_reg,
                mask_path=mask_path,
                options=options,
            )
        )
    if problems:
        listing = "\n  ".join(problems)
        hint = ""
        if missing_captions and not captions_from_filenames:
            hint = "\n(or set data.caption_from_filename = true to caption images without a file by their name)"
        raise DatasetError(
            f"{root}: {len(problems)} problem(s) in the dataset; fix or remove these files:\n  {listing}{hint}"
        )
    if black_masks and notes is not None:
        notes.append(f"{len(black_masks)} mask(s) in {mask_dir} are black everywhere, so their images train nothing "
                     f"(they still take their place in batches); e.g. {black_masks[0]}")
    if masks and notes is not None:
        unused = sorted(p for found in masks.values() for p in found)
        notes.append(f"{len(unused)} mask(s) in {mask_dir} have no image in {root} and are not used; e.g. {unused[0]}")
    if empty_captions and notes is not None:
        notes.append(
            f"{len(empty_captions)} caption file(s) in {root} are empty, so those images train without a prompt; "
            f"e.g. {empty_captions[0]}"
        )
    return records


def scan_dataset(data: DataConfig, notes: list[str] | None = None) -> list[ImageRecord]:
    """Every image of a DataConfig: data.train_dir (with data.repeats and data.mask_dir), then
    data.reg_dir (is_reg), then each [[data.subsets]] entry with its own settings, in that order.

    Raises:
        DatasetError: when no folder of training images is set, when two folders overlap (an image
        would be trained twice, or validated and trained), or on any problem `scan_image_folder` finds.
    """
    sources = _sources(data)
    if not any(not s.get("is_reg") for s in sources):
        what = "only regularisation folders are set" if sources else "data.train_dir is not set"
        raise DatasetError(
            f"{what}: point data.train_dir at a folder of images with {data.caption_extension} captions, or list "
            "folders in [[data.subsets]]"
        )
    _refuse_overlaps(dataset_folders(data))
    records: list[ImageRecord] = []
    for s in sources:
        records += scan_image_folder(notes=notes, captions_from_filenames=data.caption_from_filename, **s)
    return records


def dataset_folders(data: DataConfig) -> list[tuple[str, str]]:
    """(config key, folder) of every image folder a DataConfig reads, validation included."""
    folders = [(s["key"], s["root"]) for s in _sources(data)]
    return folders + ([("data.val_dir", data.val_dir)] if data.val_dir else [])


def _sources(data: DataConfig) -> list[dict]:
    """scan_image_folder arguments of each folder a DataConfig names."""
    sources = []
    if data.train_dir:
        sources.append(dict(root=data.train_dir, caption_extension=data.caption_extension, repeats=data.repeats,
                            key="data.train_dir", mask_dir=data.mask_dir))
    if data.reg_dir:
        sources.append(dict(root=data.reg_dir, caption_extension=data.caption_extension, key="data.reg_dir",
                            label=data.reg_dir, is_reg=True))
    for i, subset in enumerate(data.subsets):
        options = SubsetOptions(flip_p=subset.flip_p, cond_dropout=subset.cond_dropout,
                                shuffle_tags=subset.shuffle_tags, keep_tokens=subset.keep_tokens)
        sources.append(dict(root=subset.dir, caption_extension=subset.caption_extension or data.caption_extension,
                            repeats=subset.repeats, key=f"data.subsets[{i}].dir", label=subset.dir,
                            is_reg=subset.is_reg, options=options, mask_dir=subset.mask_dir,
                            mask_key=f"data.subsets[{i}].mask_dir"))
    return sources


def _refuse_overlaps(folders: list[tuple[str, str]]) -> None:
    """Two dataset folders that are the same or one inside the other would use an image twice."""
    resolved = [(key, path, Path(path).resolve()) for key, path in folders]
    for i, (key_a, path_a, a) in enumerate(resolved):
        for key_b, path_b, b in resolved[i + 1 :]:
            if (a == b or a in b.parents or b in a.parents) and key_b == "data.val_dir":
                raise DatasetError(
                    f"data.val_dir = '{path_b}' overlaps {key_a} = '{path_a}': validation images would be trained "
                    "on. Use a separate folder, or leave data.val_dir unset and hold out images with data.val_split"
                )
            if a == b or a in b.parents or b in a.parents:
                raise DatasetError(
                    f"{key_a} = '{path_a}' and {key_b} = '{path_b}' overlap: their images would be used twice. Give "
                    "every folder its own images"
                )


def _require_folder(path: Path, key: str, expected: str) -> None:
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "folder not found"
        raise DatasetError(f"{key} = '{path}' ({path.absolute()}): {what} (expected {expected})")


def _whole_if_whole(value: float) -> int | float:
    """Repeats as an int when whole (N_ folders, most configs), else rounded to 6 decimals, so sums of
    fractions such as 10 x 0.1 come out exact in data/epoch.py."""
    value = round(value, 6)
    return int(value) if float(value).is_integer() else value


def _read_caption(path: Path, extension: str, reg_class: str | None, from_name: bool, problems: list[str]) -> str | None:
    """The caption file's text; without one the reg class, else the file name (when asked), else None
    with a problem."""
    caption_path = path.with_suffix(extension)
    if caption_path.is_file():
        try:
            return caption_path.read_text(encoding="utf-8-sig").strip()  # -sig: drop a BOM
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{caption_path}: unreadable caption ({e}; save it as UTF-8)")
            return None
    if reg_class is not None:
        return reg_class
    if from_name:
        caption = caption_from_filename(path)
        if not caption:
            problems.append(f"{path}: no caption file {caption_path.name}, and the file name gives an empty caption "
                            "(data.caption_from_filename reads it up to the first '_')")
            return None
        return caption
    problems.append(f"{path}: missing caption file {caption_path.name}")
    return None


def _read_multipliers(root: Path, files: list[Path], is_reg: bool, problems: list[str]) -> dict[Path, float]:
    """{folder: repeats} from each folder's multiply.txt (EveryDream2), checked."""
    multipliers = {}
    for path in (p for p in files if p.name.lower() == MULTIPLY_FILE):
        try:
            text = path.read_text(encoding="utf-8-sig").strip()
            value = float(text)
        except (OSError, UnicodeDecodeError, ValueError):
            problems.append(f"{path}: expected one number (the repeats of this folder's images, e.g. 2 or 0.5)")
            continue
        if not value > 0 or value == float("inf"):
            problems.append(f"{path}: repeats {text} must be above 0")
        elif is_reg and not value.is_integer():
            problems.append(f"{path}: repeats {text} for regularisation images must be whole (they are balanced "
                            "against the training images each epoch; the repeats only weight them)")
        elif path.parent != root and REPEAT_FOLDER.match(path.parent.name):
            problems.append(f"{path}: both this file and the folder name '{path.parent.name}' set the repeats; "
                            "keep one")
        else:
            multipliers[path.parent] = value
    return multipliers


def _mask_index(mask_dir: Path, mask_key: str, root: Path, key: str) -> dict[Path, list[Path]]:
    """{image path relative to the mask folder without extension: mask files}."""
    _require_folder(mask_dir, mask_key, "a folder of same-name grey mask images")
    masks, images = mask_dir.resolve(), root.resolve()
    if masks == images or masks in images.parents or images in masks.parents:
        raise DatasetError(f"{mask_key} = '{mask_dir}' overlaps {key} = '{root}': masks would be trained on as "
                           "images. Keep the masks in a folder of their own")
    index: dict[Path, list[Path]] = {}
    for path in walk_folder(mask_dir)[0]:
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            index.setdefault(path.relative_to(mask_dir).with_suffix(""), []).append(path)
    return index


MASK_ASPECT_TOLERANCE = 0.01
"""How far a mask's aspect ratio may be from its image's (rounding when it was saved at another scale)."""


def same_shape(mask_size: tuple[int, int], image_size: tuple[int, int]) -> bool:
    """A mask of this (width, height) fits the image: the same size, or the same shape at another scale."""
    (mw, mh), (iw, ih) = mask_size, image_size
    return abs(mw * ih - iw * mh) <= MASK_ASPECT_TOLERANCE * iw * mh


def _find_mask(path: Path, root: Path, size: tuple[int, int], masks: dict[Path, list[Path]], mask_dir,
               mask_key: str, problems: list[str], black: list[Path]) -> Path | None:
    """The image's mask (taken out of `masks`, so what is left is unused), checked: one file, readable,
    the image's shape; a mask that is black everywhere (its image trains nothing) goes to `black`."""
    relative = path.relative_to(root).with_suffix("")
    found = masks.pop(relative, [])
    if not found:
        problems.append(f"{path}: no mask {relative.name}.* in {Path(mask_dir) / relative.parent} ({mask_key}; "
                        f"looked for {', '.join(IMAGE_EXTENSIONS)})")
        return None
    if len(found) > 1:
        problems.append(f"{path}: {len(found)} masks ({', '.join(p.name for p in found)}) in {found[0].parent}; keep one")
        return None
    problem, mask_size, brightest = _check_image(found[0], brightest=True)
    if problem:
        problems.append(f"{found[0]}: unreadable mask ({problem})")
    elif size != (0, 0) and not same_shape(mask_size, size):
        problems.append(f"{found[0]}: the mask is {mask_size[0]}x{mask_size[1]}, its image {path.name} is "
                        f"{size[0]}x{size[1]} (a mask must have its image's shape; it may be saved at another scale)")
    elif brightest == 0:
        black.append(found[0])
    return found[0]


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


def _folder_notes(root: Path, key: str, folders: list[Path], images: list[Path]) -> list[str]:
    """Warnings for a folder kohya users may expect to count: `root` itself named N_name (kohya reads
    N from the subfolders of the training folder, so here it is not applied), and subfolders with no
    image anywhere below them (repeat folders without images are errors, _repeat_folder_problems)."""
    notes = []
    match = REPEAT_FOLDER.match(root.resolve().name)
    if match:
        notes.append(f"{key} = '{root}' is itself a repeat folder ('{root.resolve().name}'): its {match.group(1)} is not "
                     f"applied, as in kohya, where the N_name folders are the subfolders of the training folder. Point "
                     f"{key} at its parent folder to use each image {match.group(1)} times per epoch")
    with_images = {parent for p in images for parent in p.parents}
    empty = [f for f in folders if f not in with_images and not REPEAT_FOLDER.match(f.name)]
    if empty:
        notes.append(f"{len(empty)} subfolder(s) of {root} hold no images and are not used: "
                     f"{', '.join(str(f.relative_to(root)) for f in empty[:3])}{', ...' if len(empty) > 3 else ''}")
    return notes


def _unused_file_notes(root: Path, files: list[Path], caption_extension: str) -> list[str]:
    """Warnings for files that are neither a used image, its caption nor a multiply.txt."""
    image_stems = {p.with_suffix("") for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
    known = IMAGE_EXTENSIONS + OTHER_IMAGE_EXTENSIONS + SIDECAR_EXTENSIONS
    files = [p for p in files if p.name.lower() != MULTIPLY_FILE]
    orphans = [p for p in files if p.suffix == caption_extension and p.with_suffix("") not in image_stems]
    unknown = [p for p in files if p.suffix.lower() not in known and p.suffix != caption_extension]
    notes = []
    for what, paths in (("caption file(s) without an image", orphans), ("file(s) that are not images", unknown)):
        if paths:
            shown = ", ".join(str(p.relative_to(root)) for p in paths[:5]) + (", ..." if len(paths) > 5 else "")
            notes.append(f"{len(paths)} {what} in {root} are not used: {shown}")
    return notes


def _check_image(path: Path, brightest: bool = False) -> tuple[str | None, tuple[int, int], int | None]:
    """Decode the image fully (verify() misses truncated data); return (error text or None, size, and
    with `brightest` its brightest grey value, read from the same decode: a mask's 0 trains nothing)."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.width < 1 or image.height < 1:
                return "empty image", (0, 0), None
            peak = image.convert("L").getextrema()[1] if brightest else None
            return None, ImageOps.exif_transpose(image).size, peak  # the size a viewer shows
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__, (0, 0), None
