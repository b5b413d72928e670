"""The diffusion loss of one batch, shared by the training loop, validation and the LR finder.

    loss = objective.weight(t) · mean(mse(model.predict(objective.noisy(x0, noise, t), t, cond),
                                          objective.target(x0, noise, t)))

Nothing here knows a family: the model conditions and predicts, the objective (models/objectives.py)
draws timesteps and defines the noisy input, the target and the weight. Noise and timesteps are
arguments or come from an explicit generator: training draws them from a per-step generator,
validation passes the same fixed draw every time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difftune.data.batch import Batch
from difftune.models.base import DiffusionModel
from difftune.models.objectives import Objective


def per_sample_loss(
    model: DiffusionModel,
    objective: Objective,
    latents: torch.Tensor,
    cond: dict,
    noise: torch.Tensor,
    t: torch.Tensor,
    weighted: bool = True,
) -> torch.Tensor:
    """MSE between the model's prediction and its target, one value per sample (shape (B,)).

    `weighted`: apply the objective's training weight (Min-SNR, ...); validation measures the plain loss.
    """
    noisy = objective.noisy(latents, noise, t)
    prediction = model.predict(noisy, t, cond).float()
    target = objective.target(latents, noise, t).float()
    loss = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    return loss * objective.weight(t) if weighted else loss


def draw_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise (with optional offset noise: a per-channel constant, so the model learns to shift
    the mean brightness) from an explicit CPU generator: identical on every device and on resume."""
    shape = latents.shape
    noise = torch.randn(shape, generator=generator)
    if noise_offset > 0:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise.to(latents.device, latents.dtype)


def batch_loss(model: DiffusionModel, objective: Objective, batch: Batch, generator: torch.Generator, *,
               device: torch.device, autocast, noise_offset: float = 0.0, text_grad: bool = False,
               text_cache=None) -> torch.Tensor:
    """Mean training loss of a batch: latents, text and conditioning, then noise and timesteps drawn
    from `generator` in a fixed order (latent sample, noise, offset, timesteps). `text_cache`
    (data/text_cache.py) replaces the text encoders when they are frozen."""
    latents = model.encode_images(batch.pixels.to(device), generator)
    with autocast():
        with torch.set_grad_enabled(text_grad):
            text = text_cache.lookup(batch.captions) if text_cache is not None else model.encode_text(batch.captions)
        cond = model.condition(text, batch)
        noise = draw_noise(latents, generator, noise_offset)
        t = objective.sample_t(latents.shape[0], generator, tuple(latents.shape[-2:])).to(latents.device)
        return per_sample_loss(model, objective, latents, cond, noise, t).mean()


def step_generator(seed: int, step: int, micro_batch: int) -> torch.Generator:
    """A generator that depends only on (seed, optimizer step, micro-batch): resume-exact by construction."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 101 + micro_batch)
