"""Deterministic ("stabilized") validation loss.

Every probe item is a (image, caption, noise, timestep) quadruple fixed once from `validation.seed`:
timesteps are stratified over [0, T) so every noise level is measured, and the same noise is reused
at every evaluation. The loss is therefore identical for identical weights and independent of the
training seed and learning rate; differences between evaluations come only from the weights. This is
EveryDream2's "stabilize" idea, extended with stratified timesteps, and the base of the LR finder.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from difftune.config.schema import DataConfig
from difftune.data.batch import Batch, Sample, collate
from difftune.data.buckets import bucket_spec, placements, square_spec
from difftune.data.records import ImageRecord
from difftune.data.transforms import load_placed
from difftune.models.base import DiffusionModel
from difftune.models.objectives import Objective
from difftune.training.step import check_latent_size, latent_mask, per_sample_loss


@dataclass
class ProbeResult:
    loss: float
    """Mean over items."""
    item_losses: np.ndarray
    """Loss per probe item, shape (num_items,)."""
    timesteps: np.ndarray
    buckets: np.ndarray
    """Timestep bucket of each item (0 = least noise), for per-bucket normalisation (not the image buckets)."""


class FixedProbe:
    """A fixed set of probe items over some images; `evaluate(model, objective)` gives the deterministic loss.

    Each image keeps its own aspect-ratio bucket (data/buckets.py; center crop, no flip, as training
    would place it) and the items are evaluated in batches of one bucket. Items are ordered by bucket,
    then by image path, then by draw. The fixed draw, from `validation.seed`: first the noise of each
    bucket's items in bucket order, then one stratified set of timesteps over all items, each turned
    into its bucket's σ with that bucket's latent size (Flux's shift depends on it). With one bucket
    this is the draw the probe made before buckets. With a mask configured (data.alpha_mask,
    data.mask_dir) the probe's loss is masked as the training loss is: the validation loss then measures
    what training optimises, and the masked-out pixels (which nothing trains) add no noise to it.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        data: DataConfig | int,
        seed: int,
        draws_per_image: int = 1,
        batch_size: int = 8,
        num_buckets: int = 5,
    ):
        """`data`: the DataConfig (its buckets and masks), or a resolution for one square bucket."""
        if not records:
            raise ValueError("a validation probe needs at least one image")
        self.spec = square_spec(data) if isinstance(data, int) else bucket_spec(data)
        self.alpha_mask = False if isinstance(data, int) else data.alpha_mask
        placed = placements(self.spec, records)
        order = sorted(range(len(records)), key=lambda i: (placed[i].bucket, records[i].key))
        self.records = [records[i] for i in order]
        self._buckets = [placed[i].bucket for i in order]
        self.resolution = self.spec.resolution
        self.seed = seed
        self.draws = draws_per_image
        self.batch_size = batch_size
        self.num_buckets = num_buckets
        self._groups: list[_Group] | None = None
        self._timesteps: torch.Tensor | None = None

    @property
    def num_items(self) -> int:
        return len(self.records) * self.draws

    @property
    def captions(self) -> list[str]:
        return [r.caption for r in self.records for _ in range(self.draws)]

    @property
    def masked(self) -> bool:
        return self.alpha_mask or any(r.mask_path is not None for r in self.records)

    def _prepare(self, model: DiffusionModel, objective: Objective) -> None:
        """Encode images once per bucket (VAE mean, center crop, no augmentation) and draw the fixed
        noise and timesteps."""
        if self._groups is not None:
            return
        groups, start = [], 0
        for bucket in dict.fromkeys(self._buckets):
            records = [r for r, b in zip(self.records, self._buckets, strict=True) if b == bucket]
            groups.append(self._encode(model, objective, records, start))
            start += len(records) * self.draws
        generator = torch.Generator().manual_seed(self.seed)
        for group in groups:
            group.noise = torch.randn(group.latents.shape, generator=generator)
        state = generator.get_state()
        timesteps = []
        for group in groups:  # the same stratified draw for every bucket, each item's σ at its bucket's size
            drawn = objective.probe_t(self.num_items, torch.Generator().set_state(state), group.latent_hw)
            timesteps.append(drawn[group.start : group.start + len(group.latents)])
        self._groups, self._timesteps = groups, torch.cat(timesteps)

    def _encode(self, model: DiffusionModel, objective: Objective, records: list[ImageRecord], start: int) -> _Group:
        latents, samples, masks = [], [], []
        for first in range(0, len(records), self.batch_size):
            chunk = records[first : first + self.batch_size]
            loaded = [load_placed(r.path, self.spec.place, alpha_mask=self.alpha_mask, mask_path=r.mask_path)
                      for r in chunk]
            encoded = model.encode_images(torch.stack([item.pixels for item in loaded]))
            check_latent_size(model, objective, encoded)
            latents.append(encoded.cpu())
            if self.masked:
                pixel_masks = torch.stack([item.mask if item.mask is not None else torch.ones_like(item.pixels[:1])
                                           for item in loaded])
                masks.append(latent_mask(pixel_masks, encoded).cpu())
            samples += [Sample(torch.empty(0), r.caption, item.original_size, item.crop_top_left, item.bucket)
                        for r, item in zip(chunk, loaded, strict=True) for _ in range(self.draws)]
        meta = collate(samples)
        meta.pixels = None  # the probe keeps latents; the metadata is what conditioning reads
        meta.masks = torch.cat(masks).repeat_interleave(self.draws, dim=0) if masks else None  # latent resolution
        return _Group(torch.cat(latents).repeat_interleave(self.draws, dim=0), meta, start)

    @torch.no_grad()
    def evaluate(self, model: DiffusionModel, objective: Objective, autocast=None, text_cache=None) -> ProbeResult:
        """Loss of every probe item under the current weights (modules put in eval mode, then restored);
        `text_cache` (data/text_cache.py) gives the captions' text outputs instead of the encoders."""
        self._prepare(model, objective)
        modules = [module for role, module in model.parts.items() if role != "vae"]
        was_training = [m.training for m in modules]
        for m in modules:
            m.eval()
        device = model.device
        losses, levels = [], []
        try:
            for group in self._groups:
                timesteps = self._timesteps[group.start : group.start + len(group.latents)]
                for start in range(0, len(group.latents), self.batch_size):
                    end = min(start + self.batch_size, len(group.latents))
                    meta = group.meta.slice(start, end)
                    mask = None if meta.masks is None else meta.masks.to(device)
                    with autocast() if autocast else nullcontext():
                        text = (text_cache.lookup(meta.captions) if text_cache is not None
                                else model.encode_text(meta.captions))
                        cond = model.condition(text, meta)
                        loss = per_sample_loss(model, objective, group.latents[start:end].to(device), cond,
                                               group.noise[start:end].to(device), timesteps[start:end].to(device),
                                               weighted=False, mask=mask)
                    losses.append(loss.double().cpu())
                levels.append(objective.level(timesteps, group.latent_hw))
        finally:
            for m, training in zip(modules, was_training, strict=True):
                m.train(training)
        item_losses = torch.cat(losses).numpy()
        timesteps = self._timesteps.numpy()
        levels = torch.cat(levels).numpy()
        buckets = np.minimum((levels * self.num_buckets).astype(np.int64), self.num_buckets - 1)
        return ProbeResult(float(item_losses.mean()), item_losses, timesteps, buckets)


@dataclass
class _Group:
    """The probe items of one bucket: latents (and the masks in `meta`) at latent resolution, the fixed noise."""

    latents: torch.Tensor
    meta: Batch
    start: int
    """Index of the group's first item among all items."""
    noise: torch.Tensor | None = None

    @property
    def latent_hw(self) -> tuple[int, int]:
        return tuple(self.latents.shape[-2:])
