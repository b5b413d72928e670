"""The typed batch every family's conditioning and the training step read.

Besides pixels and captions it carries what the image was before it became a training crop: SDXL's
micro-conditioning (`add_time_ids`) is built from the original size, the crop's top-left corner and
the target size, and later features (masks, per-sample loss weights, regularization images) travel
in the same object instead of new positional arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from difftune.data.buckets import Size  # noqa: F401  (re-exported: (height, width) in pixels)


@dataclass
class Sample:
    """One training or probe image after loading and augmentation."""

    pixels: torch.Tensor
    """(3, H, W) in [-1, 1]."""
    caption: str
    original_size: Size
    """The image's size before resizing (after its EXIF rotation)."""
    crop_top_left: Size
    """(top, left) of the crop in the resized image; mirrored when the sample is flipped."""
    target_size: Size
    """The crop's size (the image's bucket): what the model is trained to produce."""
    is_reg: bool = False
    mask: torch.Tensor | None = None
    """(1, H, W) loss weights in [0, 1], cropped and flipped as the pixels (data.alpha_mask, data.mask_dir)."""
    latent_mean: torch.Tensor | None = None
    """(C, h, w) the VAE's latent mean in raw VAE space, when the latents are cached (data/latent_cache.py:
    then pixels are an empty placeholder and a mask is at latent resolution)."""
    latent_std: torch.Tensor | None = None
    """(C, h, w) the VAE's latent std, with latent_mean."""


@dataclass
class Batch:
    pixels: torch.Tensor | None
    """(B, 3, H, W) in [-1, 1]; None where only the metadata travels (the validation probe keeps latents)."""
    captions: list[str]
    original_sizes: list[Size]
    crop_top_lefts: list[Size]
    target_sizes: list[Size]
    masks: torch.Tensor | None = None
    """(B, 1, H, W) loss weights in [0, 1] at pixel resolution, or None (no mask: every pixel trains). The
    validation probe keeps them at latent resolution (its pixels are None)."""
    loss_weights: torch.Tensor | None = None
    """(B,) per-sample weights (e.g. prior-preservation), or None."""
    is_reg: list[bool] = field(default_factory=list)
    latent_mean: torch.Tensor | None = None
    """(B, C, h, w) cached latent distributions (data/latent_cache.py; pixels are None, masks at latent
    resolution): the step samples mean + std·ε from its generator instead of running the VAE."""
    latent_std: torch.Tensor | None = None
    text: dict | None = None
    """The text encoders' outputs for `captions`, computed ahead (data/encode_ahead.py), or None."""

    def __len__(self) -> int:
        return len(self.captions)

    def slice(self, start: int, end: int) -> Batch:
        """Items start..end (the validation probe evaluates its fixed items in chunks)."""
        return Batch(
            pixels=None if self.pixels is None else self.pixels[start:end], captions=self.captions[start:end],
            original_sizes=self.original_sizes[start:end], crop_top_lefts=self.crop_top_lefts[start:end],
            target_sizes=self.target_sizes[start:end],
            masks=None if self.masks is None else self.masks[start:end],
            loss_weights=None if self.loss_weights is None else self.loss_weights[start:end],
            is_reg=self.is_reg[start:end],
            latent_mean=None if self.latent_mean is None else self.latent_mean[start:end],
            latent_std=None if self.latent_std is None else self.latent_std[start:end],
        )


def collate(samples: list[Sample]) -> Batch:
    """Samples of one bucket into a batch; where some have a mask, the others train everywhere (ones).
    Cached samples (latent_mean set) give a batch of latent distributions and no pixels."""
    cached = samples[0].latent_mean is not None
    masks = None
    if any(s.mask is not None for s in samples):
        like = (lambda s: s.latent_mean[:1].float()) if cached else (lambda s: s.pixels[:1])
        masks = torch.stack([s.mask if s.mask is not None else torch.ones_like(like(s)) for s in samples])
    return Batch(
        pixels=None if cached else torch.stack([s.pixels for s in samples]),
        captions=[s.caption for s in samples],
        original_sizes=[s.original_size for s in samples],
        crop_top_lefts=[s.crop_top_left for s in samples],
        target_sizes=[s.target_size for s in samples],
        masks=masks,
        is_reg=[s.is_reg for s in samples],
        latent_mean=torch.stack([s.latent_mean for s in samples]) if cached else None,
        latent_std=torch.stack([s.latent_std for s in samples]) if cached else None,
    )
