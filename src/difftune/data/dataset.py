"""The training dataset over image records, batched by aspect-ratio bucket.

Training order: an epoch's samples (data/epoch.py: record indices with their repeats, fractional
repeats drawn within each bucket so every bucket's count is the same every epoch) are permuted from
(train.seed, epoch); grouped by bucket in that order (a shuffle within each bucket), cut into batches
(data/buckets.py says how, short buckets included), and the batches are permuted from (train.seed,
epoch) again. With a single bucket the second permutation is left out, so the order is exactly the one
difftune made before buckets. A sample's augmentation is drawn from (train.seed, epoch, position),
position being its place in the epoch's batch order. All are pure functions of those numbers, so
resuming at (epoch, batch) reproduces the run exactly, with any number of loader workers.

Every epoch has `batches_per_epoch` batches, the count of epoch 0 (what training/plan.py counts).
Whole repeats keep every bucket's count, and so the batch count, the same every epoch; fractional
repeats can move a bucket's count by one (data/epoch.py), and then an epoch with more batches drops
its last ones and one with fewer repeats its first ones, so the run's length never moves.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from difftune.config.schema import DataConfig
from difftune.data.batch import Sample, collate
from difftune.data.buckets import (
    Size,
    batches_per_epoch,
    bucket_batch_sizes,
    bucket_counts,
    bucket_spec,
    placements,
)
from difftune.data.epoch import epoch_samples
from difftune.data.records import ImageRecord
from difftune.data.transforms import load_placed, process_caption
from difftune.errors import DatasetError


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


def batch_order(num_batches: int, seed: int, epoch: int) -> list[int]:
    """The permutation of an epoch's batches (buckets mixed), independent of epoch_order's draw."""
    generator = torch.Generator().manual_seed((seed * 100_003 + epoch) * 2 + 1)
    return torch.randperm(num_batches, generator=generator).tolist()


@dataclass(frozen=True)
class SampleKey:
    record: int
    epoch: int
    position: int


@dataclass(frozen=True)
class Draws:
    """A sample's augmentation: crop position (None: centered), flip, and the caption as trained."""

    crop: float | None
    flip: bool
    caption: str


def option(record: ImageRecord, name: str, data: DataConfig):
    """A record's own setting ([[data.subsets]]) where it has one, else the DataConfig's."""
    value = getattr(record.options, name, None) if record.options is not None else None
    return getattr(data, name) if value is None else value


class TrainDataset(Dataset):
    """Map-style dataset indexed by SampleKey; augmentation is seeded by the key."""

    def __init__(self, records: list[ImageRecord], data: DataConfig, seed: int):
        self.records = records
        self.data = data
        self.seed = seed
        self.spec = bucket_spec(data)
        self.placements = placements(self.spec, records)

    def __len__(self) -> int:
        return len(self.records)

    def draws(self, key: SampleKey) -> Draws:
        """The sample's random choices, drawn from (seed, epoch, position) in a fixed order: the crop (a
        center crop draws nothing), the flip, then the caption's dropout and tag shuffle. The latent cache
        (data/latent_cache.py) makes the same draws without opening the image."""
        record = self.records[key.record]
        rng = random.Random(f"{self.seed}:{key.epoch}:{key.position}")
        crop = None if self.data.center_crop else rng.random()
        flip_p = option(record, "flip_p", self.data)
        flip = flip_p > 0 and rng.random() < flip_p
        caption = process_caption(
            record.caption,
            rng,
            cond_dropout=option(record, "cond_dropout", self.data),
            shuffle_tags=option(record, "shuffle_tags", self.data),
            keep_tokens=option(record, "keep_tokens", self.data),
        )
        return Draws(crop, flip, caption)

    def __getitem__(self, key: SampleKey) -> Sample:
        record = self.records[key.record]
        draws = self.draws(key)
        loaded = load_placed(record.path, self.spec.place, draws.crop, draws.flip, alpha_mask=self.data.alpha_mask,
                             mask_path=record.mask_path)
        if loaded.bucket != self.placements[key.record].bucket:
            raise DatasetError(f"{record.path}: the image changed since the dataset was scanned (it is now "
                               f"{loaded.original_size[1]}x{loaded.original_size[0]}); start the run again")
        return Sample(loaded.pixels, draws.caption, original_size=loaded.original_size,
                      crop_top_left=loaded.crop_top_left, target_size=loaded.bucket, is_reg=record.is_reg,
                      mask=loaded.mask)


class TrainBatches:
    """Iterates micro-batches of one epoch from a given position (in batches)."""

    def __init__(self, records: list[ImageRecord], data: DataConfig, batch_size: int, seed: int):
        self.dataset = TrainDataset(records, data, seed)
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = data.num_workers
        self._groups = [p.bucket for p in self.dataset.placements]
        first = epoch_samples(records, seed, 0, self._groups)
        self.samples_per_epoch = len(first)
        self.batches_per_epoch = batches_per_epoch(bucket_counts(self.dataset.placements, first), batch_size)

    def epoch(self, epoch: int, start_batch: int = 0):
        """Micro-batches of `epoch`, skipping the first `start_batch` (resume)."""
        yield from self._iterate(self.epoch_keys(epoch)[start_batch:])

    def epoch_keys(self, epoch: int) -> list[list[SampleKey]]:
        """The keys of every micro-batch of `epoch`, in training order (see the module docstring)."""
        expanded = epoch_samples(self.dataset.records, self.seed, epoch, self._groups)
        groups: dict[Size, list[int]] = {}
        for index in epoch_order(len(expanded), self.seed, epoch):
            record = expanded[index]
            groups.setdefault(self.dataset.placements[record].bucket, []).append(record)
        alone = len(groups) == 1
        batches = []
        for bucket in sorted(groups):
            members, start = groups[bucket], 0
            for size in bucket_batch_sizes(len(members), self.batch_size, alone):
                batches.append([members[(start + j) % len(members)] for j in range(size)])  # % : a short lone bucket wraps
                start += size
        if not alone:
            batches = [batches[i] for i in batch_order(len(batches), self.seed, epoch)]
        if batches and len(batches) != self.batches_per_epoch:
            batches = [batches[i % len(batches)] for i in range(self.batches_per_epoch)]
        keys, position = [], 0
        for batch in batches:
            keys.append([SampleKey(record, epoch, position + j) for j, record in enumerate(batch)])
            position += len(batch)
        return keys

    def _iterate(self, batched: list[list[SampleKey]]):
        if self.num_workers == 0:
            for batch_keys in batched:
                yield collate([self.dataset[k] for k in batch_keys])
            return
        from difftune.training.run_lock import close_inherited_locks

        loader = DataLoader(
            _KeyBatchDataset(self.dataset, batched), batch_size=None, num_workers=self.num_workers, shuffle=False,
            worker_init_fn=close_inherited_locks,  # workers must not keep the run directory locked
        )
        yield from loader


class _KeyBatchDataset(Dataset):
    """Wraps pre-computed batches of keys so a DataLoader's workers build whole batches."""

    def __init__(self, dataset: TrainDataset, batched: list[list[SampleKey]]):
        self.dataset = dataset
        self.batched = batched

    def __len__(self) -> int:
        return len(self.batched)

    def __getitem__(self, index: int) -> dict:
        return collate([self.dataset[k] for k in self.batched[index]])
