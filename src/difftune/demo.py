"""The embedded default: scikit-learn's bundled handwritten digits as a captioned image folder, and a
config that trains the built-in tiny model on them on a CPU in a few minutes."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DEMO_CONFIG = "demo.toml"


def export_digits(folder: Path, size: int = 32, limit: int | None = None) -> int:
    """Write the 1,797 8x8 digits as `size`-pixel PNGs with captions ("a handwritten digit seven").

    Digits are white-on-black in scikit-learn; we keep that, upscaled smoothly. Returns the count.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    count = len(digits.images) if limit is None else min(limit, len(digits.images))
    for i in range(count):
        pixels = (digits.images[i] / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        stem = folder / f"digit_{i:04d}"
        image.save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(f"a handwritten digit {DIGIT_WORDS[digits.target[i]]}\n")
    return count


def demo_config_text() -> str:
    return resources.files("difftune.examples").joinpath(DEMO_CONFIG).read_text()
