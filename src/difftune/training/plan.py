"""The training plan: dataset, split and step arithmetic, computed once and shared by `train` and
`doctor`, so what doctor prints is exactly what training will do."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftune.config.schema import Config
from difftune.data.records import DatasetError, ImageRecord, scan_image_folder
from difftune.data.split import split_records

MIN_CROP_KEPT = 0.25
"""Warn when the square crop keeps less than this fraction of an image's area."""


@dataclass
class Plan:
    train_records: list[ImageRecord]
    val_records: list[ImageRecord]
    stable_train_records: list[ImageRecord]
    samples_per_epoch: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    effective_batch_size: int
    warnings: list[str] = field(default_factory=list)

    def folder_counts(self) -> dict[str, dict[str, int]]:
        """Images and repeats per folder, for doctor."""
        counts: dict[str, dict[str, int]] = {}
        for split, records in (("train", self.train_records), ("val", self.val_records)):
            for r in records:
                entry = counts.setdefault(r.folder, {"repeats": r.repeats, "train": 0, "val": 0})
                entry[split] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "train_images": len(self.train_records),
            "val_images": len(self.val_records),
            "stable_train_images": len(self.stable_train_records),
            "folders": self.folder_counts(),
            "samples_per_epoch": self.samples_per_epoch,
            "batches_per_epoch": self.batches_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "epochs": self.epochs,
            "effective_batch_size": self.effective_batch_size,
            "warnings": self.warnings,
        }


def make_plan(config: Config) -> Plan:
    """Scan and split the data and derive every step count. Raises DatasetError on bad data."""
    data, train = config.data, config.train
    if not data.train_dir:
        raise DatasetError("data.train_dir is not set: point it at a folder of images with .txt captions")
    warnings: list[str] = []
    records = scan_image_folder(data.train_dir, data.caption_extension, data.repeats, notes=warnings)
    if data.val_dir:
        _refuse_overlap(data.train_dir, data.val_dir)
        train_records = records
        val_records = scan_image_folder(data.val_dir, data.caption_extension, 1, key="data.val_dir", notes=warnings)
    else:
        train_records, val_records = split_records(records, data.train_dir, data.val_split, config.validation.seed)
    if not val_records:
        why = "data.val_split = 0 and no data.val_dir" if data.val_split == 0 else "a single image cannot be split"
        warnings.append(
            f"no validation images ({why}): validation loss, find-lr and find-steps need a held-out set"
        )
    elif not data.val_dir and len(val_records) / len(records) > 2 * data.val_split:
        warnings.append(
            f"data.val_split = {data.val_split} holds out {len(val_records)} of {len(records)} images "
            "(at least one is always held out)"
        )
    small = [r for r in train_records + val_records if 0 < min(r.size) < data.resolution]
    if small:
        warnings.append(
            f"{len(small)} image(s) are smaller than data.resolution ({data.resolution} px on the short side) and are "
            f"upscaled, which blurs what the model learns; e.g. {small[0].path} ({small[0].size[0]}x{small[0].size[1]})"
        )
    cut = [r for r in train_records + val_records if min(r.size) > 0 and min(r.size) / max(r.size) < MIN_CROP_KEPT]
    if cut:
        worst = min(cut, key=lambda r: min(r.size) / max(r.size))
        warnings.append(
            f"{len(cut)} image(s) lose more than {1 - MIN_CROP_KEPT:.0%} of their area to the square crop, so most of "
            f"what they show is never trained on; e.g. {worst.path} ({worst.size[0]}x{worst.size[1]} keeps "
            f"{min(worst.size) / max(worst.size):.0%}). Crop them yourself to what matters"
        )
    samples_per_epoch = sum(r.repeats for r in train_records)
    batches_per_epoch = max(1, samples_per_epoch // train.batch_size)
    if samples_per_epoch < train.batch_size:
        warnings.append(
            f"fewer samples per epoch ({samples_per_epoch}) than train.batch_size ({train.batch_size}): "
            "batches wrap around and repeat images"
        )
    elif samples_per_epoch % train.batch_size:
        warnings.append(
            f"{samples_per_epoch % train.batch_size} sample(s) per epoch do not fill a batch and are left out "
            "of that epoch (the order changes every epoch, so no image is left out for good)"
        )
    steps_per_epoch = math.ceil(batches_per_epoch / train.grad_accum)
    if train.max_steps is not None:
        total_steps = train.max_steps
        epochs = math.ceil(total_steps / steps_per_epoch)
    else:
        epochs = train.max_epochs
        total_steps = epochs * steps_per_epoch
    stable = stable_subset(train_records, config) if config.validation.stabilize_train_loss else []
    return Plan(
        train_records=train_records,
        val_records=val_records,
        stable_train_records=stable,
        samples_per_epoch=samples_per_epoch,
        batches_per_epoch=batches_per_epoch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        epochs=epochs,
        effective_batch_size=train.batch_size * train.grad_accum,
        warnings=warnings,
    )


def _refuse_overlap(train_dir: str, val_dir: str) -> None:
    """Validation images must not be trained on, or the validation loss measures memorisation."""
    train, val = Path(train_dir).resolve(), Path(val_dir).resolve()
    if train == val or train in val.parents or val in train.parents:
        raise DatasetError(
            f"data.val_dir = '{val_dir}' overlaps data.train_dir = '{train_dir}': validation images would be "
            "trained on. Use a separate folder, or leave data.val_dir unset and hold out images with data.val_split"
        )


def stable_subset(records: list[ImageRecord], config: Config) -> list[ImageRecord]:
    """A fixed subset of training images chosen by hash of (validation.seed, path)."""

    def score(r: ImageRecord) -> bytes:
        return hashlib.sha256(f"stable:{config.validation.seed}:{Path(r.path).as_posix()}".encode()).digest()

    return sorted(records, key=score)[: config.validation.stabilize_train_count]
