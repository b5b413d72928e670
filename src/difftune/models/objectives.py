"""Diffusion objectives: how a family turns clean latents into a training example and a target.

The training step, validation and the tuners only call these methods, so a family with another
objective (DDPM for the UNets, rectified flow for the transformers) plugs in without touching them:

    t      = objective.sample_t(n, generator, latent_hw)   # the training draw
    noisy  = objective.noisy(x0, noise, t)
    loss   = objective.weight(t) * mse(predict(noisy, t), objective.target(x0, noise, t))

`probe_t` places the validation probe's timesteps at evenly spaced quantiles of the same
distribution the training draws from, so the probe measures the mix of noise levels training sees;
`level(t)` says where a timestep sits in that distribution (its CDF, in [0, 1)), for the per-noise-level
normalisation of the LR finder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from difftune.models.element_loss import ElementLoss


@runtime_checkable
class Objective(Protocol):
    prediction_type: str
    """What the denoiser predicts: "epsilon", "v_prediction", "flow" (the velocity noise − x0)."""

    def sample_t(self, n: int, generator: torch.Generator, latent_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Training timesteps for n samples, drawn from `generator` on the CPU. `latent_hw` is the latent
        size of the batch, for distributions that depend on the resolution (Flux's shift)."""
        ...

    def probe_t(self, n: int, generator: torch.Generator, latent_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """n timesteps at evenly spaced quantiles of the training distribution, in a seeded order."""
        ...

    def level(self, t: torch.Tensor, latent_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Position of each timestep in the training distribution (0 = least noise), float64 in [0, 1)."""
        ...

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weight (Min-SNR and the like); ones when no weighting is configured."""
        ...

    def noise_fraction(self, t: torch.Tensor) -> torch.Tensor:
        """Where t sits between no noise (0) and pure noise (1) on the timestep axis: t / T, or σ."""
        ...

    def noise_to_signal(self, t: torch.Tensor) -> torch.Tensor:
        """The ratio of the noise's to the signal's scale in the noisy input (1 / sqrt(SNR))."""
        ...

    def elementwise_loss(self, prediction: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The configured element-wise loss (train.loss_type; models/element_loss.py), unreduced."""
        ...


class _ElementLossMixin:
    loss: ElementLoss

    def elementwise_loss(self, prediction: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.loss(prediction, target, self, t)


@dataclass
class DDPMObjective(_ElementLossMixin):
    """Discrete-time DDPM with epsilon or v-prediction (SD 1.x/2.x, SDXL), over diffusers' DDPMScheduler."""

    scheduler: object
    """diffusers DDPMScheduler: betas, alphas_cumprod, add_noise, get_velocity."""
    min_snr_gamma: float | None = None
    debiased_estimation: bool = False
    min_timestep: int = 0
    max_timestep: int | None = None
    """One past the highest timestep drawn; None: the schedule's num_train_timesteps."""
    loss: ElementLoss = field(default_factory=ElementLoss)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def timestep_range(self) -> tuple[int, int]:
        """[low, high) of the training draw (train.min_timestep / max_timestep, kohya's meaning)."""
        high = self.num_train_timesteps if self.max_timestep is None else self.max_timestep
        return self.min_timestep, high

    def sample_t(self, n: int, generator: torch.Generator, latent_hw=None) -> torch.Tensor:
        low, high = self.timestep_range
        return torch.randint(low, high, (n,), generator=generator)

    def probe_t(self, n: int, generator: torch.Generator, latent_hw=None) -> torch.Tensor:
        low, high = self.timestep_range
        order = torch.randperm(n, generator=generator)
        centers = low + ((order.double() + 0.5) * (high - low) / n).floor().long()
        return centers.clamp_(low, high - 1)

    def level(self, t: torch.Tensor, latent_hw=None) -> torch.Tensor:
        low, high = self.timestep_range  # uniform draw on [low, high): the CDF is (t - low) / (high - low)
        return ((t.double() - low) / (high - low)).clamp_(0.0, 1.0 - 1e-12)

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
        target already carries a factor of (snr + 1), hence the different denominator. Debiased
        estimation (kohya's debiased_estimation_loss) multiplies in 1/sqrt(snr) (v: 1/(snr + 1)), SNR
        capped at 1000 where t = 0 makes it near infinite, and kept >= 1e-3 where kohya's is infinite:
        a zero-terminal-SNR schedule's last step has snr = 0 (no stock schedule goes below ~0.004). There
        Min-SNR's epsilon weight is its limit, 1."""
        weight = None
        v_prediction = self.prediction_type == "v_prediction"
        if self.min_snr_gamma is not None:
            snr = self.snr(t).float()
            clipped = torch.clamp(snr, max=self.min_snr_gamma)
            denominator = snr + 1.0 if v_prediction else snr
            weight = torch.where(denominator > 0, clipped / denominator, torch.ones_like(snr))
        if self.debiased_estimation:
            snr = torch.clamp(self.snr(t).float(), min=1e-3, max=1000.0)
            debias = 1.0 / (snr + 1.0) if v_prediction else 1.0 / torch.sqrt(snr)
            weight = debias if weight is None else weight * debias
        return torch.ones(t.shape, device=t.device) if weight is None else weight

    def noise_fraction(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() / self.num_train_timesteps

    def noise_to_signal(self, t: torch.Tensor) -> torch.Tensor:
        alphas_cumprod = self.scheduler.alphas_cumprod.to(t.device)[t].float()
        return torch.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)  # kohya's huber "sigmas"; inf at zero SNR


TIMESTEP_SAMPLERS = ("uniform", "sigmoid", "logit_normal", "mode", "shift", "flux_shift")
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "cosmap")


@dataclass
class FlowMatchObjective(_ElementLossMixin):
    """Rectified flow (SD3, Flux.1): x_σ = (1 − σ)·x0 + σ·noise, the model predicts the velocity noise − x0.

    `t` here is σ itself, in (0, 1), float32; each family scales it for its transformer (Flux takes σ,
    SD3 takes 1000·σ). A draw is u from a base distribution on (0, 1), then a monotone shift to σ:

        uniform       u ~ U(0, 1)                                 then the model's shift
        sigmoid       u = sigmoid(sigmoid_scale · N(0, 1))        then the model's shift
        logit_normal  u = sigmoid(N(logit_mean, logit_std))       then the model's shift
        mode          u = f(U), f(u) = 1 − u − s·(cos²(πu/2) − 1 + u)   (SD3 paper, s = mode_scale)
        shift         u as sigmoid, then the static shift discrete_flow_shift
        flux_shift    u as sigmoid, then Flux's resolution-dependent shift: μ linear in the image's
                      token count (256 → 0.5, 4096 → 1.15), σ = e^μ / (e^μ + 1/u − 1)

    with shift_s(u) = s·u / (1 + (s − 1)·u) (s = 1 leaves u as it is). Every step of the chain is
    monotone, so the probe's quantiles are the base distribution's quantiles pushed through it, and
    `level` (the CDF) runs the chain backwards. These follow kohya sd-scripts' `timestep_sampling` and
    diffusers' `compute_density_for_timestep_sampling` / `compute_loss_weighting_for_sd3`.
    """

    sampling: str = "logit_normal"
    shift: float = 1.0
    """The model's scheduler shift (SD3: 3.0; Flux: 1.0, its shift is the resolution-dependent one)."""
    discrete_flow_shift: float | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    sigmoid_scale: float = 1.0
    weighting_scheme: str = "none"
    patch_size: int = 2
    """Latent pixels per token side, for flux_shift's token count."""
    loss: ElementLoss = field(default_factory=ElementLoss)

    prediction_type = "flow"

    def __post_init__(self):
        if self.sampling not in TIMESTEP_SAMPLERS:
            raise ValueError(f"timestep_sampling {self.sampling!r}: expected one of {', '.join(TIMESTEP_SAMPLERS)}")
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme {self.weighting_scheme!r}: expected one of {', '.join(WEIGHTING_SCHEMES)}")

    # -------------------------------------------------------------- the chain u → σ and back
    def _base_from_quantile(self, q: torch.Tensor) -> torch.Tensor:
        """u at CDF value q of the base distribution (float64)."""
        if self.sampling == "uniform":
            return q
        if self.sampling == "mode":
            return _mode_transform(1.0 - q, self.mode_scale)  # f decreases: its q-quantile is f(1 − q)
        mean, std = (self.logit_mean, self.logit_std) if self.sampling == "logit_normal" else (0.0, self.sigmoid_scale)
        return torch.sigmoid(mean + std * math.sqrt(2.0) * torch.erfinv(2.0 * q - 1.0))

    def _quantile_from_base(self, u: torch.Tensor) -> torch.Tensor:
        if self.sampling == "uniform":
            return u
        if self.sampling == "mode":
            return 1.0 - _inverse_mode_transform(u, self.mode_scale)
        mean, std = (self.logit_mean, self.logit_std) if self.sampling == "logit_normal" else (0.0, self.sigmoid_scale)
        z = (torch.logit(u) - mean) / std
        return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))

    def _exp_mu(self, latent_hw: tuple[int, int] | None) -> float:
        """The shift factor of the chain's last step: e^μ for flux_shift, s for the static shifts."""
        if self.sampling == "flux_shift":
            if latent_hw is None:
                raise ValueError("flux_shift needs the batch's latent size")
            tokens = (latent_hw[0] // self.patch_size) * (latent_hw[1] // self.patch_size)
            return math.exp(flux_mu(tokens))
        if self.sampling == "shift":
            return self.discrete_flow_shift if self.discrete_flow_shift is not None else self.shift
        return self.shift

    def sigma_from_base(self, u: torch.Tensor, latent_hw=None) -> torch.Tensor:
        s = self._exp_mu(latent_hw)
        return s * u / (1.0 + (s - 1.0) * u)  # = e^μ / (e^μ + 1/u − 1) for flux_shift

    def base_from_sigma(self, sigma: torch.Tensor, latent_hw=None) -> torch.Tensor:
        s = self._exp_mu(latent_hw)
        return sigma / (s - (s - 1.0) * sigma)

    # -------------------------------------------------------------------------- the protocol
    def sample_t(self, n: int, generator: torch.Generator, latent_hw=None) -> torch.Tensor:
        if self.sampling in ("uniform", "mode"):
            u = torch.rand(n, generator=generator, dtype=torch.float64)
            if self.sampling == "mode":
                u = _mode_transform(u, self.mode_scale)
        else:
            mean, std = (self.logit_mean, self.logit_std) if self.sampling == "logit_normal" else (0.0, self.sigmoid_scale)
            u = torch.sigmoid(mean + std * torch.randn(n, generator=generator, dtype=torch.float64))
        return self.sigma_from_base(u, latent_hw).float().clamp_(SIGMA_EPS, 1.0 - SIGMA_EPS)

    def probe_t(self, n: int, generator: torch.Generator, latent_hw=None) -> torch.Tensor:
        order = torch.randperm(n, generator=generator)
        q = (order.double() + 0.5) / n
        return self.sigma_from_base(self._base_from_quantile(q), latent_hw).float()

    def level(self, t: torch.Tensor, latent_hw=None) -> torch.Tensor:
        u = self.base_from_sigma(t.double().cpu().clamp(SIGMA_EPS, 1.0 - SIGMA_EPS), latent_hw)
        return self._quantile_from_base(u).clamp_(0.0, 1.0 - 1e-12)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = _per_sample(t, x0)
        return (1.0 - sigma) * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def noise_fraction(self, t: torch.Tensor) -> torch.Tensor:
        return t.float()

    def noise_to_signal(self, t: torch.Tensor) -> torch.Tensor:
        sigma = t.float()
        return sigma / (1.0 - sigma)  # x_σ = (1 − σ)·x0 + σ·noise

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        sigma = t.float()
        if self.weighting_scheme == "sigma_sqrt":
            return sigma.pow(-2.0)
        if self.weighting_scheme == "cosmap":
            return 2.0 / (math.pi * (1.0 - 2.0 * sigma + 2.0 * sigma**2))
        return torch.ones_like(sigma)


SIGMA_EPS = 1e-5
"""σ is kept inside (0, 1): at 0 the target is all signal and sigma_sqrt's weight is infinite."""


def flux_mu(image_tokens: int, base_tokens: int = 256, max_tokens: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent shift exponent (its pipeline's `calculate_shift`, scheduler defaults)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (image_tokens - base_tokens)


def _mode_transform(u: torch.Tensor, scale: float) -> torch.Tensor:
    return 1.0 - u - scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)


def _inverse_mode_transform(y: torch.Tensor, scale: float) -> torch.Tensor:
    """u with f(u) = y; f falls monotonically from 1 to 0 for scale < 1.75 (bisection, to float64 precision)."""
    lo, hi = torch.zeros_like(y), torch.ones_like(y)
    for _ in range(60):
        mid = (lo + hi) / 2
        above = _mode_transform(mid, scale) > y
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return (lo + hi) / 2


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


def make_flow_objective(train, shift: float, default_sampling: str, patch_size: int = 2) -> FlowMatchObjective:
    """The objective a TrainConfig asks for on a flow-matching family with this scheduler shift."""
    sampling = default_sampling if train.timestep_sampling == "auto" else train.timestep_sampling
    return FlowMatchObjective(
        sampling=sampling, shift=shift, discrete_flow_shift=train.discrete_flow_shift, logit_mean=train.logit_mean,
        logit_std=train.logit_std, mode_scale=train.mode_scale, sigmoid_scale=train.sigmoid_scale,
        weighting_scheme=train.weighting_scheme, patch_size=patch_size, loss=ElementLoss.from_train(train),
    )


FLOW_ONLY_SETTINGS = {"timestep_sampling": "auto", "weighting_scheme": "none"}
"""TrainConfig keys (with their defaults) that only flow-matching models read."""
DDPM_ONLY_SETTINGS = {"min_snr_gamma": None, "debiased_estimation": False, "zero_terminal_snr": False,
                      "min_timestep": None, "max_timestep": None}
"""TrainConfig keys (with their defaults) that only DDPM models read."""
FLOW_INSTEAD = {"min_snr_gamma": "train.weighting_scheme (none, sigma_sqrt, cosmap)",
                "debiased_estimation": "train.weighting_scheme (none, sigma_sqrt, cosmap)",
                "zero_terminal_snr": "nothing: σ = 1 is pure noise already",
                "min_timestep": "train.timestep_sampling and its settings (logit_mean, discrete_flow_shift, ...)",
                "max_timestep": "train.timestep_sampling and its settings (logit_mean, discrete_flow_shift, ...)"}


def check_objective_settings(train, objective: str, model: str) -> None:
    """ConfigError for the other objective's loss settings: they would otherwise be silently ignored.
    `objective` is the family's ("ddpm" or "flow"); `model` names it in the message."""
    from difftune.errors import ConfigError

    if objective == "flow":
        for key, default in DDPM_ONLY_SETTINGS.items():
            if getattr(train, key) != default:
                raise ConfigError(f"train.{key} is for DDPM models; {model} is trained with flow matching: "
                                  f"use {FLOW_INSTEAD[key]} instead")
    if objective == "ddpm":
        for key, default in FLOW_ONLY_SETTINGS.items():
            if getattr(train, key) != default:
                raise ConfigError(f"train.{key} = {getattr(train, key)!r} is for flow-matching models (Flux, SD3); "
                                  f"{model} is a DDPM model: use train.min_snr_gamma instead, or remove it")
