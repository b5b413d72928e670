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

from difftune.data.batch import Batch, Sample, collate
from difftune.data.records import ImageRecord
from difftune.data.transforms import load_cropped
from difftune.models.base import DiffusionModel
from difftune.models.objectives import Objective
from difftune.training.step import per_sample_loss


@dataclass
class ProbeResult:
    loss: float
    """Mean over items."""
    item_losses: np.ndarray
    """Loss per probe item, shape (num_items,)."""
    timesteps: np.ndarray
    buckets: np.ndarray
    """Timestep bucket of each item (0 = least noise), for per-bucket normalisation."""


class FixedProbe:
    """A fixed set of probe items over some images; `evaluate(model, objective)` gives the deterministic loss."""

    def __init__(
        self,
        records: list[ImageRecord],
        resolution: int,
        seed: int,
        draws_per_image: int = 1,
        batch_size: int = 8,
        num_buckets: int = 5,
    ):
        if not records:
            raise ValueError("a validation probe needs at least one image")
        self.records = sorted(records, key=lambda r: r.key)
        self.resolution = resolution
        self.seed = seed
        self.draws = draws_per_image
        self.batch_size = batch_size
        self.num_buckets = num_buckets
        self._latents: torch.Tensor | None = None
        self._meta: Batch | None = None
        self._noise: torch.Tensor | None = None
        self._timesteps: torch.Tensor | None = None

    @property
    def num_items(self) -> int:
        return len(self.records) * self.draws

    @property
    def captions(self) -> list[str]:
        return [r.caption for r in self.records for _ in range(self.draws)]

    def _prepare(self, model: DiffusionModel, objective: Objective) -> None:
        """Encode images once (VAE mean, center crop, no augmentation) and draw the fixed noise and timesteps."""
        if self._latents is not None:
            return
        latents, samples = [], []
        for start in range(0, len(self.records), self.batch_size):
            chunk = self.records[start : start + self.batch_size]
            loaded = [load_cropped(r.path, self.resolution) for r in chunk]
            latents.append(model.encode_images(torch.stack([pixels for pixels, _, _ in loaded])).cpu())
            size = (self.resolution, self.resolution)
            samples += [Sample(torch.empty(0), r.caption, original, crop, size)
                        for r, (_, original, crop) in zip(chunk, loaded, strict=True) for _ in range(self.draws)]
        per_image = torch.cat(latents)
        self._latents = per_image.repeat_interleave(self.draws, dim=0)
        self._meta = collate(samples)
        self._meta.pixels = None  # the probe keeps latents; the metadata is what conditioning reads
        generator = torch.Generator().manual_seed(self.seed)
        self._noise = torch.randn(self._latents.shape, generator=generator)
        self._timesteps = objective.probe_t(self.num_items, generator, tuple(self._latents.shape[-2:]))

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
        losses = []
        try:
            for start in range(0, self.num_items, self.batch_size):
                end = min(start + self.batch_size, self.num_items)
                latents = self._latents[start:end].to(device)
                meta = self._meta.slice(start, end)
                with autocast() if autocast else nullcontext():
                    text = text_cache.lookup(meta.captions) if text_cache is not None else model.encode_text(meta.captions)
                    cond = model.condition(text, meta)
                    loss = per_sample_loss(model, objective, latents, cond, self._noise[start:end].to(device),
                                           self._timesteps[start:end].to(device), weighted=False)
                losses.append(loss.double().cpu())
        finally:
            for m, training in zip(modules, was_training, strict=True):
                m.train(training)
        item_losses = torch.cat(losses).numpy()
        timesteps = self._timesteps.numpy()
        levels = objective.level(self._timesteps, tuple(self._latents.shape[-2:])).numpy()
        buckets = np.minimum((levels * self.num_buckets).astype(np.int64), self.num_buckets - 1)
        return ProbeResult(float(item_losses.mean()), item_losses, timesteps, buckets)
