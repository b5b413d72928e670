"""Image and caption transforms. Randomness comes from an explicit generator, never global state,
so a sample's augmentation depends only on (seed, epoch, position) and a resumed run repeats it."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageOps

from difftune.data.batch import Size


def load_image(path, resolution: int, crop_position: float | None = None) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square, return (3, H, W) in [-1, 1].

    `crop_position` in [0, 1] picks the crop offset along the long side (None = center).
    """
    return load_cropped(path, resolution, crop_position)[0]


def load_cropped(path, resolution: int, crop_position: float | None = None,
                 flip: bool = False) -> tuple[torch.Tensor, Size, Size]:
    """load_image's pixels (flipped horizontally if asked) with the image's original (height, width)
    and the crop's (top, left) in the resized image: what SDXL's micro-conditioning is built from. A
    flipped crop's left is measured from the other side, as diffusers' SDXL training script does."""
    with Image.open(path) as image:
        image = _to_rgb(ImageOps.exif_transpose(image))  # phone photos store rotation in EXIF
        original = (image.height, image.width)
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    fraction = 0.5 if crop_position is None else crop_position
    left = round((image.width - resolution) * fraction)
    top = round((image.height - resolution) * fraction)
    cropped = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    if flip:
        pixels, left = pixels.flip(-1), image.width - left - resolution
    return pixels, original, (top, left)


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
