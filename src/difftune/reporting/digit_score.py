"""How many samples a digit classifier reads as the digit their prompt names (the demo's data).

A validation loss says how well the model denoises; whether its samples look like the digits is what a
person checks. For the demo's digits (scikit-learn's bundled 8x8 handwritten digits, captioned "a
handwritten digit seven") a small classifier trained on those same digits reads each sample, shrunk
to 8x8 grey levels as the dataset is; the score is the fraction read as the prompted digit. It is
computed only when every sample prompt names a digit ("digit seven"), so other runs are untouched.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
from PIL import Image

from difftune.demo import DIGIT_WORDS

PROMPTED = re.compile(r"\bdigit\s+(" + "|".join(DIGIT_WORDS) + r")\b", re.IGNORECASE)


def prompted_digit(prompt: str) -> int | None:
    found = PROMPTED.search(prompt)
    return DIGIT_WORDS.index(found.group(1).lower()) if found else None


@lru_cache(maxsize=1)
def classifier():
    """An RBF SVM on all 1,797 bundled digits (97% accurate in 5-fold cross-validation on them)."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    return SVC(gamma=0.001 * 16**2, C=10.0).fit(digits.images.reshape(len(digits.images), -1) / 16.0, digits.target)


def features(image: Image.Image) -> np.ndarray:
    """An image as the dataset's 64 grey levels in [0, 1] (white digit on black, as the demo draws them)."""
    small = image.convert("L").resize((8, 8), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64).reshape(-1) / 255.0


def read_digits(images: list[Image.Image]) -> list[int]:
    return [int(d) for d in classifier().predict(np.stack([features(i) for i in images]))]


def digit_score(images: list[Image.Image], prompts: list[str]) -> float | None:
    """The fraction of `images` read as their prompt's digit; None unless every prompt names one."""
    wanted = [prompted_digit(p) for p in prompts]
    if not images or any(w is None for w in wanted):
        return None
    return float(np.mean([read == w for read, w in zip(read_digits(images), wanted, strict=True)]))
