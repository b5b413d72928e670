"""The benchmark's problems: small CPU fine-tuning setups with different data, model and network.

Every problem is a difftune config (the same thing a user writes) plus the data it needs, generated
deterministically under the work folder. The constant-LR grid, the LR finder and the check runs all
train exactly this config with only `train.lr` and `train.seed` changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 16


@dataclass
class Problem:
    name: str
    description: str
    steps: int
    """Step budget of every grid run (constant LR, best validation loss over the run counts)."""
    grid: list[float]
    """Constant LRs of the brute-force grid (log-spaced, chosen to bracket the optimum)."""
    config: Callable[[Path], dict[str, Any]]
    """Work folder → config dict (data prepared by `prepare`)."""
    prepare: Callable[[Path], None]
    needs: str | None = None
    """A difftune feature the problem needs (checked before running), e.g. 'lora'."""
    find_lr: dict[str, Any] = field(default_factory=dict)
    """find_lr settings of the problem (the sweep range; everything else is difftune's default)."""


def geometric_grid(low: float, factor: float, count: int) -> list[float]:
    return [float(f"{low * factor**i:.3g}") for i in range(count)]


# ----------------------------------------------------------------------------------------------- data
def export_digit_subset(
    folder: Path, digits: set[int] | None, limit: int, size: int = RESOLUTION, inverted: bool = False
) -> None:
    """scikit-learn's digits (only the given classes) as captioned PNGs, in file-name order; `inverted`
    draws them dark on white (a look the white-on-black base has never seen)."""
    from sklearn.datasets import load_digits

    from difftune.demo import DIGIT_WORDS

    if folder.is_dir() and any(folder.iterdir()):
        return
    folder.mkdir(parents=True, exist_ok=True)
    data = load_digits()
    count = 0
    for i, (pixels, target) in enumerate(zip(data.images, data.target, strict=True)):
        if digits is not None and int(target) not in digits:
            continue
        values = (pixels / 16.0 * 255).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(255 - values if inverted else values, mode="L")
        image.resize((size, size), Image.Resampling.BICUBIC).convert("RGB").save(folder / f"digit_{i:04d}.png")
        ink = "dark ink on white, " if inverted else ""
        (folder / f"digit_{i:04d}.txt").write_text(f"{ink}a handwritten digit {DIGIT_WORDS[int(target)]}\n")
        count += 1
        if count >= limit:
            break


SHAPES = ["circle", "square", "triangle", "cross"]
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}


def export_shapes(
    folder: Path, count: int, size: int = RESOLUTION, seed: int = 0, aspects: tuple[tuple[int, int], ...] = ((1, 1),)
) -> None:
    """A synthetic captioned dataset: coloured shapes at random positions and sizes on a grey ground.

    Drawn at 4x and downsampled, so edges are anti-aliased like photos rather than aliased pixels. Each
    image takes one of `aspects` (width : height, about size² pixels), in turn: photos of every shape,
    for the bucket problem.
    """
    if folder.is_dir() and any(folder.iterdir()):
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        aw, ah = aspects[i % len(aspects)]
        scale = (size * size / (aw * ah)) ** 0.5
        width, height = round(aw * scale), round(ah * scale)
        big_w, big_h = width * 4, height * 4
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color_name = list(COLORS)[int(rng.integers(len(COLORS)))]
        ground = int(rng.integers(60, 110))
        image = Image.new("RGB", (big_w, big_h), (ground, ground, ground))
        draw = ImageDraw.Draw(image)
        radius = min(big_w, big_h) * float(rng.uniform(0.18, 0.32))
        cx, cy = float(rng.uniform(radius, big_w - radius)), float(rng.uniform(radius, big_h - radius))
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        fill = COLORS[color_name]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
        else:
            w = radius / 3
            draw.rectangle((cx - w, cy - radius, cx + w, cy + radius), fill=fill)
            draw.rectangle((cx - radius, cy - w, cx + radius, cy + w), fill=fill)
        image.resize((width, height), Image.Resampling.LANCZOS).save(folder / f"shape_{i:04d}.png")
        (folder / f"shape_{i:04d}.txt").write_text(f"a {color_name} {shape}\n")


def pretrained_base(work: Path, model: str = "tiny-sd") -> Path:
    """A built-in tiny model briefly pre-trained on the digits 0-6 (the base the fine-tune problems start
    from: users fine-tune a pre-trained model, not a random one)."""
    from difftune.config.loading import validate_config
    from difftune.training.loop import train

    base = work / ("base-digits-0-6" if model == "tiny-sd" else f"base-{model}-digits-0-6")
    final = base / "checkpoints" / "final"
    if (final / "model_index.json").is_file():
        return final
    data = work / "data" / "digits-0-6"
    export_digit_subset(data / "1_digits", set(range(7)), limit=600)
    config = validate_config({
        "model": {"path": model},
        "data": {"train_dir": str(data), "resolution": RESOLUTION, "val_split": 0.05},
        "train": {"batch_size": 16, "lr": 2e-3, "lr_warmup_steps": 20, "max_steps": 500, "seed": 0, "clip_grad_norm": 1.0},
        "validation": {"every_n_steps": 100, "batch_size": 64},
        "output": {"dir": str(base), "tensorboard": False, "overwrite": True, "save_state": False},
    }, "bench base pre-training")
    train(config, show_progress=False)
    return final


# ------------------------------------------------------------------------------------------- problems
def _common(train_dir: Path, out: Path, **sections) -> dict[str, Any]:
    config: dict[str, Any] = {
        "model": {"path": "tiny-sd"},
        "data": {"train_dir": str(train_dir), "resolution": RESOLUTION, "val_split": 0.2},
        "train": {"batch_size": 8, "lr": 1e-3, "lr_warmup_steps": 10, "seed": 1},
        "validation": {"batch_size": 64, "draws_per_image": 2, "seed": 3},
        "output": {"dir": str(out), "tensorboard": False, "overwrite": True, "save_state": False},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def _digits_full(work: Path) -> dict[str, Any]:
    return _common(work / "data" / "digits-all", work / "runs" / "digits-full")


def _prepare_digits_full(work: Path) -> None:
    export_digit_subset(work / "data" / "digits-all" / "1_digits", None, limit=200)


def _prepare_lora_concept(work: Path) -> None:
    pretrained_base(work)
    export_shapes(work / "data" / "shapes-40" / "1_shapes", 40, seed=1)


def _lora_concept(work: Path) -> dict[str, Any]:
    return _common(
        work / "data" / "shapes-40", work / "runs" / "lora-concept",
        model={"path": str(pretrained_base(work))},
        data={"val_split": 0.25},
        train={"batch_size": 4},
        validation={"draws_per_image": 8},  # 10 held-out images: more fixed draws each
        network={"type": "lora", "rank": 8},
    )


def _prepare_full_concept(work: Path) -> None:
    pretrained_base(work)
    export_digit_subset(work / "data" / "inverted-7-9" / "1_digits", {7, 8, 9}, limit=40, inverted=True)


def _full_concept(work: Path) -> dict[str, Any]:
    return _common(
        work / "data" / "inverted-7-9", work / "runs" / "full-concept",
        model={"path": str(pretrained_base(work))},
        data={"val_split": 0.25},
        train={"batch_size": 4},
        validation={"draws_per_image": 8},
    )


def _prepare_sdxl_full(work: Path) -> None:
    pretrained_base(work, "tiny-sdxl")
    _prepare_shapes(work)


def _sdxl_full(work: Path) -> dict[str, Any]:
    # A rank-8 LoRA of this base on the 40 shapes never lowered the validation loss in 150 steps at any LR
    # from 1e-4 to 3e-2 (measured): a full fine-tune on the 200 shapes is the problem that has an optimum.
    return _common(work / "data" / "shapes", work / "runs" / "sdxl-full",
                   model={"path": str(pretrained_base(work, "tiny-sdxl"))})


BUCKET_RESOLUTION = 24
"""The bucket problem's resolution: at 24 px the buckets include 16x32, 24x24 and 32x16."""
BUCKET_ASPECTS = ((1, 1), (2, 1), (1, 2))


def _prepare_bucket_lora(work: Path) -> None:
    pretrained_base(work)
    export_shapes(work / "data" / "shapes-buckets" / "1_shapes", 60, size=BUCKET_RESOLUTION, seed=2,
                  aspects=BUCKET_ASPECTS)


def _bucket_lora(work: Path) -> dict[str, Any]:
    return _common(
        work / "data" / "shapes-buckets", work / "runs" / "bucket-lora",
        model={"path": str(pretrained_base(work))},
        data={"val_split": 0.25, "resolution": BUCKET_RESOLUTION, "enable_bucket": True},
        train={"batch_size": 4},
        validation={"draws_per_image": 4},
        network={"type": "lora", "rank": 8},
    )


def _prepare_shapes(work: Path) -> None:
    export_shapes(work / "data" / "shapes" / "1_shapes", 200)


def _shapes_v(work: Path) -> dict[str, Any]:
    return _common(work / "data" / "shapes", work / "runs" / "shapes-v", model={"path": "tiny-sd-v"})


def _shapes_lion(work: Path) -> dict[str, Any]:
    return _common(work / "data" / "shapes", work / "runs" / "shapes-lion", optimizer={"name": "lion"})


def _flow_shapes(work: Path) -> dict[str, Any]:
    return _common(work / "data" / "shapes", work / "runs" / "flow-shapes", model={"path": "tiny-flux"})


PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in [
        Problem(
            "digits-full",
            "full fine-tune of the built-in tiny model (epsilon) on 200 handwritten digits, 16 px, batch 8",
            steps=200, grid=geometric_grid(5e-4, 2**0.5, 13), config=_digits_full, prepare=_prepare_digits_full,
            find_lr={"start_lr": 1e-6, "end_lr": 1e-1},
        ),
        Problem(
            "lora-concept",
            "LoRA (rank 8) on a tiny base pre-trained on digits 0-6, learning a concept it never saw: "
            "coloured shapes (30 train / 10 val images), batch 4",
            steps=150, grid=geometric_grid(1e-3, 2**0.5, 15), config=_lora_concept, prepare=_prepare_lora_concept,
            needs="lora", find_lr={"start_lr": 1e-6, "end_lr": 1e-1},
        ),
        Problem(
            "shapes-v",
            "full fine-tune of the built-in tiny v-prediction model on 200 synthetic coloured shapes, 16 px, batch 8",
            steps=200, grid=geometric_grid(5e-4, 2**0.5, 13), config=_shapes_v, prepare=_prepare_shapes,
            find_lr={"start_lr": 1e-6, "end_lr": 1e-1},
        ),
        Problem(
            "full-concept",
            "full fine-tune of the same pre-trained base on the held-back digits 7-9 drawn dark on white "
            "(30 train / 10 val), batch 4",
            steps=150, grid=geometric_grid(2.5e-5, 2**0.5, 15), config=_full_concept, prepare=_prepare_full_concept,
            find_lr={"start_lr": 1e-7, "end_lr": 1e-1},
        ),
        Problem(
            "shapes-lion",
            "held out (added after the default rule's factor was fixed on the four above): full fine-tune of "
            "the tiny model (epsilon) on the 200 shapes with the Lion optimizer, batch 8",
            steps=200, grid=geometric_grid(1e-4, 2**0.5, 13), config=_shapes_lion, prepare=_prepare_shapes,
            find_lr={"start_lr": 1e-7, "end_lr": 1e-2},
        ),
        Problem(
            "flow-shapes",
            "held out (added with the flow-matching families, after the rule was fixed): full fine-tune of the "
            "built-in tiny Flux-shaped transformer (rectified flow, flux_shift sampling) on the 200 shapes, batch 8",
            steps=200, grid=geometric_grid(1e-3, 2**0.5, 17), config=_flow_shapes, prepare=_prepare_shapes,
            find_lr={"start_lr": 1e-6, "end_lr": 1e-1},
        ),
        Problem(
            "sdxl-full",
            "held out (added with the headline issue, after the rule was fixed): full fine-tune of the built-in "
            "tiny SDXL (two text encoders, size conditioning) pre-trained on digits 0-6, on the 200 coloured "
            "shapes, batch 8",
            steps=200, grid=geometric_grid(5e-5, 2**0.5, 13), config=_sdxl_full, prepare=_prepare_sdxl_full,
            find_lr={"start_lr": 1e-7, "end_lr": 1e-1},
        ),
        Problem(
            "bucket-lora",
            "held out (added with the headline issue): LoRA (rank 8) on the tiny base pre-trained on digits 0-6, "
            "learning coloured shapes on canvases of three aspect ratios (1:1, 2:1, 1:2) at 24 px in aspect-ratio "
            "buckets (45 train / 15 val), batch 4",
            steps=150, grid=geometric_grid(1.41e-3, 2**0.5, 9), config=_bucket_lora, prepare=_prepare_bucket_lora,
            needs="lora", find_lr={"start_lr": 1e-6, "end_lr": 1e-1},
        ),
    ]
}
