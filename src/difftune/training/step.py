"""The diffusion loss of one batch, shared by the training loop, validation and the LR finder.

    loss = objective.weight(t) · mean(mse(model.predict(objective.noisy(x0, noise, t), t, cond),
                                          objective.target(x0, noise, t)))

Nothing here knows a family: the model conditions and predicts, the objective (models/objectives.py)
draws timesteps and defines the noisy input, the target and the weight. Noise and timesteps are
arguments or come from an explicit generator: training draws them from a per-step generator,
validation passes the same fixed draw every time.

Masked training (data.alpha_mask, data.mask_dir): the squared error is weighted per latent pixel by the
mask, area-averaged down to the latent grid (each latent pixel weighs the image pixels it encodes), and
then averaged over all latent pixels, as kohya's apply_masked_loss does: the loss is not divided by
the mask's area. So a sample counts in proportion to the area it trains, learning rates carry over
from kohya, and an image with a small mask does not get its few pixels' error (and noise) magnified
into a full sample's gradient. Regularisation samples (`Batch.is_reg`) are weighted by
train.prior_loss_weight, as kohya's loss_weights, before the batch mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difftune.data.batch import Batch
from difftune.errors import ConfigError
from difftune.models.base import DiffusionModel
from difftune.models.objectives import Objective
from difftune.training.noise import NoiseOptions, draw_noise, input_noise

__all__ = ["batch_loss", "draw_noise", "per_sample_loss", "step_generator"]


def per_sample_loss(
    model: DiffusionModel,
    objective: Objective,
    latents: torch.Tensor,
    cond: dict,
    noise: torch.Tensor,
    t: torch.Tensor,
    weighted: bool = True,
    mask: torch.Tensor | None = None,
    noisy_with: torch.Tensor | None = None,
) -> torch.Tensor:
    """The element-wise loss (train.loss_type; MSE by default) between the model's prediction and
    its target, averaged to one value per sample (shape (B,)).

    `weighted`: apply the objective's training weight (Min-SNR, ...); validation measures the configured
    element-wise loss without it.
    `mask`: (B, 1, h, w) weights at latent resolution (latent_mask), or None (every pixel counts).
    `noisy_with`: the noise the input is made with when it is not the target's (input perturbation).
    """
    noisy = objective.noisy(latents, noise if noisy_with is None else noisy_with, t)
    prediction = model.predict(noisy, t, cond).float()
    target = objective.target(latents, noise, t).float()
    error = objective.elementwise_loss(prediction, target, t)
    if mask is not None:
        error = error * mask
    loss = error.mean(dim=(1, 2, 3))
    return loss * objective.weight(t) if weighted else loss


def latent_mask(masks: torch.Tensor | None, latents: torch.Tensor) -> torch.Tensor | None:
    """Pixel-resolution masks (B, 1, H, W) area-averaged to the latents' grid, on their device."""
    if masks is None:
        return None
    return F.interpolate(masks.float(), size=tuple(latents.shape[-2:]), mode="area").to(latents.device)


def sample_weights(batch: Batch, prior_loss_weight: float = 1.0) -> torch.Tensor | None:
    """Per-sample loss weights: Batch.loss_weights, and prior_loss_weight on regularisation samples
    (None when every weight is 1, so the plain loss is computed exactly as without them)."""
    weights = batch.loss_weights
    if prior_loss_weight != 1.0 and any(batch.is_reg):
        prior = torch.tensor([prior_loss_weight if reg else 1.0 for reg in batch.is_reg])
        weights = prior if weights is None else weights * prior
    return weights


def check_latent_size(model: DiffusionModel, objective: Objective, latents: torch.Tensor) -> None:
    """A transformer that cuts latents into patches (Flux, SD3: 2x2) needs latent sides that are
    multiples of the patch; the bucket settings say which pixel sides a batch has."""
    patch = getattr(objective, "patch_size", 1)
    height, width = latents.shape[-2:]
    if height % patch or width % patch:
        factor = getattr(model, "vae_scale_factor", 8)
        raise ConfigError(
            f"a batch of {width * factor}x{height * factor} px has {width}x{height} latents, but this model's "
            f"transformer takes {patch}x{patch} latent patches: every side must be a multiple of {factor * patch} px. "
            f"Set data.resolution and data.bucket_reso_steps to multiples of {factor * patch}")


def batch_loss(model: DiffusionModel, objective: Objective, batch: Batch, generator: torch.Generator, *,
               device: torch.device, autocast, noise_options: NoiseOptions = NoiseOptions(), text_grad: bool = False,
               text_cache=None, prior_loss_weight: float = 1.0) -> torch.Tensor:
    """Mean training loss of a batch: latents, text and conditioning, then noise and timesteps drawn
    from `generator` in a fixed order (latent sample, noise and its options, timesteps, input
    perturbation: training/noise.py). `text_cache`
    (data/text_cache.py) replaces the text encoders when they are frozen; masks and the samples'
    weights apply as the module docstring says."""
    latents = (model.encode_images(batch.pixels.to(device), generator) if batch.latent_mean is None
               else model.latents_from_distribution(batch.latent_mean.to(device), batch.latent_std.to(device),
                                                    generator))  # cached (data/latent_cache.py): the same draw
    check_latent_size(model, objective, latents)
    mask = latent_mask(batch.masks, latents)
    weights = sample_weights(batch, prior_loss_weight)
    with autocast():
        with torch.set_grad_enabled(text_grad):
            if batch.text is not None:  # encoded ahead (data/encode_ahead.py): frozen encoders only
                text = batch.text
            else:
                text = text_cache.lookup(batch.captions) if text_cache is not None else model.encode_text(batch.captions)
        cond = model.condition(text, batch)
        noise = draw_noise(latents, generator, noise_options)
        t = objective.sample_t(latents.shape[0], generator, tuple(latents.shape[-2:])).to(latents.device)
        noisy_with = input_noise(noise, generator, noise_options)
        loss = per_sample_loss(model, objective, latents, cond, noise, t, mask=mask, noisy_with=noisy_with)
        return loss.mean() if weights is None else (loss * weights.to(loss.device)).mean()


def step_generator(seed: int, step: int, micro_batch: int) -> torch.Generator:
    """A generator that depends only on (seed, optimizer step, micro-batch): resume-exact by construction."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 101 + micro_batch)
