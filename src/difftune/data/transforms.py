"""Image and caption transforms. Randomness comes from an explicit generator, never global state,
so a sample's augmentation depends only on (seed, epoch, position) and a resumed run repeats it."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from difftune.data.buckets import Placement, Size, resize_scale, square_spec
from difftune.data.records import same_shape
from difftune.errors import DatasetError


def load_image(path, resolution: int, crop_position: float | None = None) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square, return (3, H, W) in [-1, 1].

    `crop_position` in [0, 1] picks the crop offset along the long side (None = center).
    """
    return load_cropped(path, resolution, crop_position)[0]


def load_cropped(path, resolution: int, crop_position: float | None = None,
                 flip: bool = False) -> tuple[torch.Tensor, Size, Size]:
    """load_image's pixels (flipped horizontally if asked) with the image's original (height, width)
    and the crop's (top, left) in the resized image: what SDXL's micro-conditioning is built from."""
    loaded = load_placed(path, square_spec(resolution).place, crop_position, flip)
    return loaded.pixels, loaded.original_size, loaded.crop_top_left


@dataclass
class Loaded:
    pixels: torch.Tensor
    """(3, H, W) in [-1, 1], H x W the bucket."""
    original_size: Size
    """(height, width) after the EXIF rotation, before resizing."""
    crop_top_left: Size
    bucket: Size
    mask: torch.Tensor | None = None
    """(1, H, W) loss weights in [0, 1], cropped and flipped as the pixels; None without a mask."""


def load_placed(path, place: Callable[[Size], Placement], crop_position: float | None = None, flip: bool = False,
                *, alpha_mask: bool = False, mask_path=None) -> Loaded:
    """Resize the image to cover its bucket (`place(original size)`, data/buckets.py), crop the bucket
    at `crop_position` along each side with room (None = center), flip horizontally if asked.

    The mask (the image's alpha channel with `alpha_mask`, or the grey image at `mask_path`) is
    resized with the same size and filter, cropped with the same box and flipped with the pixels. A
    flipped crop's left is measured from the other side, as diffusers' SDXL training script does.
    """
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)  # phone photos store rotation in EXIF
        original = (image.height, image.width)
        mask = _alpha(image) if alpha_mask else None
        if mask_path is not None:
            mask = _mask_file(mask_path, image.size, path)
        image = _to_rgb(image)
    placement = place(original)
    (bucket_h, bucket_w), (height, width) = placement.bucket, placement.resized
    scale = resize_scale(placement.bucket, original)
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    image = image.resize((width, height), resample)
    fraction = 0.5 if crop_position is None else crop_position
    left = round((width - bucket_w) * fraction)
    top = round((height - bucket_h) * fraction)
    box = (left, top, left + bucket_w, top + bucket_h)
    pixels = torch.from_numpy(np.asarray(image.crop(box), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    if mask is not None:
        mask = mask.resize((width, height), resample).crop(box)  # "L": the filter's overshoot is clipped to 0..255
        mask = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]
    if flip:
        pixels, left = pixels.flip(-1), width - left - bucket_w
        mask = None if mask is None else mask.flip(-1)
    return Loaded(pixels, original, (top, left), placement.bucket, mask)


def _alpha(image: Image.Image) -> Image.Image:
    """The alpha channel as an "L" image; an image without one is opaque everywhere (kohya does so)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA").getchannel("A")
    return Image.new("L", image.size, 255)


def _mask_file(mask_path, image_size: tuple[int, int], image_path) -> Image.Image:
    """The mask image as "L" at the image's (width, height): a mask saved at another scale is resized,
    one of another shape is an error (it is most likely another image's mask)."""
    try:
        with Image.open(mask_path) as opened:
            mask = _to_grey(ImageOps.exif_transpose(opened))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{mask_path}: unreadable mask of {image_path} ({e})") from None
    if mask.size != image_size:
        (mw, mh), (iw, ih) = mask.size, image_size
        if not same_shape(mask.size, image_size):
            raise DatasetError(f"{mask_path}: mask is {mw}x{mh} but its image {image_path} is {iw}x{ih}; a mask must "
                               "have its image's shape (it may be saved at another scale)")
        mask = mask.resize(image_size, Image.Resampling.BILINEAR)
    return mask


def _to_grey(image: Image.Image) -> Image.Image:
    """A mask as 8-bit grey (16-bit grey scaled, colour averaged by Pillow's luma)."""
    if image.mode.startswith("I"):
        return _to_rgb(image).convert("L")
    return image.convert("L")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Transparent pixels become white (as most trainers do), palette and grey images become RGB,
    16-bit grey is scaled to 8 bits (Pillow's convert would clip it to white)."""
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I" (16-bit grey PNGs open as one of these)
        array = np.asarray(image).astype(np.float64)
        scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 1.0
        return Image.fromarray(np.clip(array * scale + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def process_caption(
    caption: str, rng: random.Random, *, cond_dropout: float, shuffle_tags: bool, keep_tokens: int
) -> str:
    """Caption dropout (train unconditionally) and tag shuffling with the first `keep_tokens` fixed."""
    if cond_dropout > 0 and rng.random() < cond_dropout:
        return ""
    if shuffle_tags:
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        head, tail = tags[:keep_tokens], tags[keep_tokens:]
        rng.shuffle(tail)
        caption = ", ".join(head + tail)
    return caption
