"""The training plan: dataset, split, buckets and step arithmetic, computed once and shared by `train`
and `doctor`, so what doctor prints is exactly what training will do (the batch count per epoch is
data/buckets.py's rule over data/epoch.py's samples, the same the dataset iterates)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftune.config.schema import Config
from difftune.data.buckets import (
    BucketSpec,
    Placement,
    batches_per_epoch,
    bucket_batch_sizes,
    bucket_counts,
    kept_fraction,
    placements,
    resize_scale,
    resolve_data,
)
from difftune.data.epoch import epoch_samples, reg_balance_note
from difftune.data.records import DatasetError, ImageRecord, scan_dataset, scan_image_folder
from difftune.data.split import split_records

MIN_CROP_KEPT = 0.25
"""Warn when the crop to an image's bucket keeps less than this fraction of its area."""


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
    buckets: list[dict[str, Any]] = field(default_factory=list)
    samples_by_record: list[int] = field(default_factory=list)
    """Uses of each training record in the first epoch (repeats, fractional picks, reg balancing)."""
    """The training images' buckets: resolution [width, height], images, samples and batches per epoch."""

    def folder_counts(self) -> dict[str, dict[str, int]]:
        """Images and repeats per folder, for doctor."""
        counts: dict[str, dict[str, int]] = {}
        uses = self.samples_by_record or [0] * len(self.train_records)
        for split, records in (("train", self.train_records), ("val", self.val_records)):
            for i, r in enumerate(records):
                entry = counts.setdefault(r.folder, {"repeats": r.repeats, "train": 0, "val": 0, "samples": 0,
                                                     "reg": r.is_reg})
                entry[split] += 1
                if split == "train":
                    entry["samples"] += uses[i]
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "train_images": sum(not r.is_reg for r in self.train_records),
            "reg_images": sum(r.is_reg for r in self.train_records),
            "val_images": len(self.val_records),
            "stable_train_images": len(self.stable_train_records),
            "folders": self.folder_counts(),
            "samples_per_epoch": self.samples_per_epoch,
            "batches_per_epoch": self.batches_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "epochs": self.epochs,
            "effective_batch_size": self.effective_batch_size,
            "buckets": self.buckets,
            "warnings": self.warnings,
        }


def make_plan(config: Config) -> Plan:
    """Scan and split the data and derive every step count. Raises DatasetError on bad data."""
    data, train = config.data, config.train
    warnings: list[str] = []
    if data.val_dir and data.train_dir:
        _refuse_overlap(data.train_dir, data.val_dir)
    _refuse_writing_into_datasets(config)
    records = scan_dataset(data, notes=warnings)  # data.train_dir, data.reg_dir, [[data.subsets]]
    if data.val_dir:
        train_records = records
        val_records = scan_image_folder(data.val_dir, data.caption_extension, 1, key="data.val_dir", notes=warnings)
    else:
        train_records, val_records = split_records(records, data.train_dir, data.val_split, config.validation.seed)
    trained = [r for r in records if not r.is_reg]
    if not val_records:
        why = "data.val_split = 0 and no data.val_dir" if data.val_split == 0 else "a single image cannot be split"
        warnings.append(
            f"no validation images ({why}): validation loss, find-lr and find-steps need a held-out set"
        )
    elif not data.val_dir and len(val_records) / len(trained) > 2 * data.val_split:
        warnings.append(
            f"data.val_split = {data.val_split} holds out {len(val_records)} of {len(trained)} images "
            "(at least one is always held out)"
        )
    spec, notes = resolve_data(data)
    warnings += notes
    placed = placements(spec, train_records)
    warnings += _image_warnings(spec, train_records + val_records, placed + placements(spec, val_records))
    if note := reg_balance_note(train_records):
        warnings.append(note)
    samples = epoch_samples(train_records, train.seed, 0, [p.bucket for p in placed])
    counts = bucket_counts(placed, samples)
    samples_per_epoch = len(samples)
    batches = batches_per_epoch(counts, train.batch_size)
    table = _bucket_table(placed, counts, train.batch_size)
    warnings += _batch_warnings(table, samples_per_epoch, train.batch_size)
    steps_per_epoch = math.ceil(batches / train.grad_accum)
    if train.max_steps is not None:
        total_steps = train.max_steps
        epochs = math.ceil(total_steps / steps_per_epoch)
    else:
        epochs = train.max_epochs
        total_steps = epochs * steps_per_epoch
    stable = stable_subset([r for r in train_records if not r.is_reg], config) \
        if config.validation.stabilize_train_loss else []
    return Plan(
        train_records=train_records,
        val_records=val_records,
        stable_train_records=stable,
        samples_per_epoch=samples_per_epoch,
        batches_per_epoch=batches,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        epochs=epochs,
        effective_batch_size=train.batch_size * train.grad_accum,
        warnings=warnings,
        buckets=table,
        samples_by_record=_uses(samples, len(train_records)),
    )


def _image_warnings(spec: BucketSpec, records: list[ImageRecord], placed: list[Placement]) -> list[str]:
    """Images that are upscaled, or that lose most of their area to the crop."""
    warnings = []
    square = spec.predefined() == [(spec.resolution, spec.resolution)]
    if square:  # one square bucket: upscaled means a short side below the resolution
        small = [r for r, p in zip(records, placed, strict=True) if resize_scale(p.bucket, _hw(r)) > 1]
        if small:
            warnings.append(
                f"{len(small)} image(s) are smaller than data.resolution ({spec.resolution} px on the short side) and "
                f"are upscaled, which blurs what the model learns; e.g. {small[0].path} ({small[0].size[0]}x"
                f"{small[0].size[1]})"
            )
    else:
        smallest = min((p.bucket for p in placed), key=lambda b: (b[0] * b[1], b)) if spec.no_upscale else \
            min(spec.predefined(), key=lambda b: (b[0] * b[1], b))
        small = [r for r in records if r.size[0] * r.size[1] < smallest[0] * smallest[1]]
        if small:
            example = min(small, key=lambda r: r.size[0] * r.size[1])
            warnings.append(
                f"{len(small)} image(s) have fewer pixels than the smallest bucket ({smallest[1]}x{smallest[0]}) and "
                f"are upscaled, which blurs what the model learns; e.g. {example.path} ({example.size[0]}x"
                f"{example.size[1]})" + ("" if spec.no_upscale else "; data.bucket_no_upscale = true trains them "
                                         "at their own size")
            )
    cut = [(r, kept_fraction(p.bucket, _hw(r))) for r, p in zip(records, placed, strict=True)]
    cut = [(r, kept) for r, kept in cut if kept < MIN_CROP_KEPT]
    if cut:
        worst, kept = min(cut, key=lambda rk: rk[1])
        crop = "the square crop" if square else "the crop to their bucket"
        warnings.append(
            f"{len(cut)} image(s) lose more than {1 - MIN_CROP_KEPT:.0%} of their area to {crop}, so most of "
            f"what they show is never trained on; e.g. {worst.path} ({worst.size[0]}x{worst.size[1]} keeps "
            f"{kept:.0%}). Crop them yourself to what matters"
        )
    return warnings


def _hw(record: ImageRecord) -> tuple[int, int]:
    return record.size[1], record.size[0]


def _bucket_table(placed: list[Placement], counts: dict, batch_size: int) -> list[dict[str, Any]]:
    """One row per bucket in use: resolution [width, height], images, samples and batches per epoch."""
    images: dict = {}
    for p in placed:
        images[p.bucket] = images.get(p.bucket, 0) + 1
    alone = len([n for n in counts.values() if n]) == 1
    return [
        {"resolution": [bucket[1], bucket[0]], "images": images[bucket], "samples": counts.get(bucket, 0),
         "batches": len(bucket_batch_sizes(counts.get(bucket, 0), batch_size, alone))}
        for bucket in sorted(images, key=lambda b: (b[1] / b[0], b))  # tall to wide
    ]


def _batch_warnings(table: list[dict[str, Any]], samples_per_epoch: int, batch_size: int) -> list[str]:
    """Samples that sit an epoch out, short buckets, and buckets of one image."""
    warnings = []
    if len(table) == 1:
        if samples_per_epoch < batch_size:
            warnings.append(
                f"fewer samples per epoch ({samples_per_epoch}) than train.batch_size ({batch_size}): "
                "batches wrap around and repeat images"
            )
        elif samples_per_epoch % batch_size:
            warnings.append(
                f"{samples_per_epoch % batch_size} sample(s) per epoch do not fill a batch and are left out "
                "of that epoch (the order changes every epoch, so no image is left out for good)"
            )
        return warnings
    name = "{0}x{1}".format
    short = [row for row in table if 0 < row["samples"] < batch_size]
    if short:
        shown = ", ".join(f"{name(*row['resolution'])} ({row['samples']})" for row in short[:5])
        warnings.append(
            f"{len(short)} bucket(s) have fewer samples per epoch than train.batch_size ({batch_size}) and train as "
            f"one short batch each, as kohya does: {shown}{', ...' if len(short) > 5 else ''}"
        )
    left = sum(row["samples"] % batch_size for row in table if row["samples"] >= batch_size)
    if left:
        warnings.append(
            f"{left} sample(s) per epoch do not fill a batch of their bucket and are left out of that epoch (the "
            "order changes every epoch, so no image is left out for good)"
        )
    lone = [row for row in table if row["images"] == 1]
    if lone:
        shown = ", ".join(name(*row["resolution"]) for row in lone[:5])
        warnings.append(
            f"{len(lone)} bucket(s) hold a single image, which then trains in batches of its own: {shown}"
            f"{', ...' if len(lone) > 5 else ''}. Crop it to a more common shape, or raise data.bucket_reso_steps"
        )
    return warnings


def _refuse_writing_into_datasets(config: Config) -> None:
    """A run directory or cache inside an image folder would put checkpoints, plots and cache entries
    among the user's images (kohya users keep datasets and outputs apart; the next scan would find
    them), so it is refused before anything is written."""
    from difftune.data.records import dataset_folders

    writes = [("output.dir", config.output.dir)]  # the default latent cache lives under it
    if config.data.cache_latents == "disk" and config.data.latent_cache_dir:
        writes.append(("data.latent_cache_dir", config.data.latent_cache_dir))
    for out_key, out in writes:
        target = Path(out).resolve()
        for key, folder in dataset_folders(config.data):
            root = Path(folder).resolve()
            if target == root or root in target.parents:
                raise DatasetError(
                    f"{out_key} = '{out}' is inside {key} = '{folder}': the run would write its files among your "
                    f"images, and the next scan would find them. Choose a {out_key} outside the dataset folders")


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


def _uses(samples: list[int], count: int) -> list[int]:
    uses = [0] * count
    for i in samples:
        uses[i] += 1
    return uses
