"""Diffusion objectives: how a family turns clean latents into a training example and a target.

The training step, validation and the tuners only call these methods, so a family with another
objective (flow matching, next) plugs in without touching them:

    t      = objective.sample_t(n, generator)        # the training draw
    noisy  = objective.noisy(x0, noise, t)
    loss   = objective.weight(t) * mse(predict(noisy, t), objective.target(x0, noise, t))

`probe_t` places the validation probe's timesteps at evenly spaced quantiles of the same
distribution the training draws from, so the probe measures the mix of noise levels training sees;
`level(t)` says where a timestep sits in that distribution (its CDF, in [0, 1)), for the per-noise-level
normalisation of the LR finder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Objective(Protocol):
    prediction_type: str
    """What the denoiser predicts: "epsilon", "v_prediction" (later: "flow")."""

    def sample_t(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Training timesteps for n samples, drawn from `generator` on the CPU."""
        ...

    def probe_t(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n timesteps at evenly spaced quantiles of the training distribution, in a seeded order."""
        ...

    def level(self, t: torch.Tensor) -> torch.Tensor:
        """Position of each timestep in the training distribution (0 = least noise), float64 in [0, 1)."""
        ...

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weight (Min-SNR and the like); ones when no weighting is configured."""
        ...


@dataclass
class DDPMObjective:
    """Discrete-time DDPM with epsilon or v-prediction (SD 1.x/2.x, SDXL), over diffusers' DDPMScheduler."""

    scheduler: object
    """diffusers DDPMScheduler: betas, alphas_cumprod, add_noise, get_velocity."""
    min_snr_gamma: float | None = None

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def sample_t(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def probe_t(self, n: int, generator: torch.Generator) -> torch.Tensor:
        order = torch.randperm(n, generator=generator)
        centers = ((order.double() + 0.5) * self.num_train_timesteps / n).floor().long()
        return centers.clamp_(0, self.num_train_timesteps - 1)

    def level(self, t: torch.Tensor) -> torch.Tensor:
        return t.double() / self.num_train_timesteps  # uniform draw: the CDF is t / T

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        return noise

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        alphas_cumprod = self.scheduler.alphas_cumprod.to(t.device)[t]
        return alphas_cumprod / (1.0 - alphas_cumprod)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ (Hang et al. 2023) caps the weight of low-noise timesteps. For v-prediction the
        target already carries a factor of (snr + 1), hence the different denominator."""
        if self.min_snr_gamma is None:
            return torch.ones(t.shape, device=t.device)
        snr = self.snr(t).float()
        clipped = torch.clamp(snr, max=self.min_snr_gamma)
        denominator = snr + 1.0 if self.prediction_type == "v_prediction" else snr
        return clipped / denominator
