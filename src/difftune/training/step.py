"""The diffusion loss of one batch, shared by the training loop, validation and the LR finder.

Noise and timesteps are arguments, not drawn inside: training draws them from a per-step generator,
validation passes the same fixed draw every time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difftune.models.base import DiffusionModel


def per_sample_loss(
    model: DiffusionModel,
    latents: torch.Tensor,
    conditioning: dict[str, torch.Tensor],
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """MSE between the model's prediction and its target, one value per sample (shape (B,))."""
    noisy = model.add_noise(latents, noise, timesteps)
    prediction = model.predict(noisy, timesteps, conditioning).float()
    target = model.loss_target(latents, noise, timesteps).float()
    loss = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma is not None:
        loss = loss * min_snr_weight(model, timesteps, min_snr_gamma)
    return loss


def min_snr_weight(model: DiffusionModel, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weighting (Hang et al. 2023): caps the weight of low-noise timesteps.

    For v-prediction the target already carries a factor of (snr + 1), hence the different denominator.
    """
    snr = model.snr(timesteps).float()
    clipped = torch.clamp(snr, max=gamma)
    denominator = snr + 1.0 if model.prediction_type == "v_prediction" else snr
    return clipped / denominator


def draw_noise_and_timesteps(
    latents: torch.Tensor, generator: torch.Generator, num_train_timesteps: int, noise_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian noise (with optional offset noise) and uniform timesteps from an explicit CPU generator,
    so the draw is identical on every device and on resume."""
    shape = latents.shape
    noise = torch.randn(shape, generator=generator)
    if noise_offset > 0:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    timesteps = torch.randint(0, num_train_timesteps, (shape[0],), generator=generator)
    return noise.to(latents.device, latents.dtype), timesteps.to(latents.device)


def step_generator(seed: int, step: int, micro_batch: int) -> torch.Generator:
    """A generator that depends only on (seed, optimizer step, micro-batch): resume-exact by construction."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 101 + micro_batch)
