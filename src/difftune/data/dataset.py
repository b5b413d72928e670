"""The training and validation datasets over image records.

Training order: each epoch is a permutation of the repeat-expanded record list drawn from
(train.seed, epoch); a sample's augmentation is drawn from (train.seed, epoch, position). Both are
pure functions of those numbers, so resuming at (epoch, position) reproduces the run exactly, with
any number of loader workers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from difftune.config.schema import DataConfig
from difftune.data.batch import Sample, collate
from difftune.data.records import ImageRecord
from difftune.data.transforms import load_cropped, process_caption


def expand_repeats(records: list[ImageRecord]) -> list[int]:
    """Record indices with each repeated `repeats` times (one epoch's worth)."""
    return [i for i, r in enumerate(records) for _ in range(r.repeats)]


def epoch_order(num_records_expanded: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_records_expanded, generator=generator).tolist()


@dataclass(frozen=True)
class SampleKey:
    record: int
    epoch: int
    position: int


class TrainDataset(Dataset):
    """Map-style dataset indexed by SampleKey; augmentation is seeded by the key."""

    def __init__(self, records: list[ImageRecord], data: DataConfig, seed: int):
        self.records = records
        self.data = data
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: SampleKey) -> Sample:
        record = self.records[key.record]
        rng = random.Random(f"{self.seed}:{key.epoch}:{key.position}")
        crop = None if self.data.center_crop else rng.random()
        flip = self.data.flip_p > 0 and rng.random() < self.data.flip_p
        pixels, original, crop_top_left = load_cropped(record.path, self.data.resolution, crop, flip)
        caption = process_caption(
            record.caption,
            rng,
            cond_dropout=self.data.cond_dropout,
            shuffle_tags=self.data.shuffle_tags,
            keep_tokens=self.data.keep_tokens,
        )
        size = (self.data.resolution, self.data.resolution)
        return Sample(pixels, caption, original_size=original, crop_top_left=crop_top_left, target_size=size)


class TrainBatches:
    """Iterates micro-batches of one epoch from a given position (in samples)."""

    def __init__(self, records: list[ImageRecord], data: DataConfig, batch_size: int, seed: int):
        self.dataset = TrainDataset(records, data, seed)
        self.expanded = expand_repeats(records)
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = data.num_workers

    @property
    def samples_per_epoch(self) -> int:
        return len(self.expanded)

    @property
    def batches_per_epoch(self) -> int:
        """Full micro-batches only: a short last batch would change the gradient scale."""
        return max(1, len(self.expanded) // self.batch_size)

    def epoch(self, epoch: int, start_batch: int = 0):
        """Micro-batches of `epoch`, skipping the first `start_batch` (resume). A dataset smaller than
        one batch wraps around so every batch is full."""
        order = epoch_order(len(self.expanded), self.seed, epoch)
        keys = [
            SampleKey(self.expanded[order[pos % len(order)]], epoch, pos)
            for pos in range(start_batch * self.batch_size, self.batches_per_epoch * self.batch_size)
        ]
        batched = [keys[i : i + self.batch_size] for i in range(0, len(keys), self.batch_size)]
        yield from self._iterate(batched)

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
