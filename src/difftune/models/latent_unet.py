"""What every latent-UNet family (SD 1.x/2.x, SDXL) does the same way, written once.

The adapters (`models/sd/adapter.py`, `models/sdxl/adapter.py`) are dataclasses of their components
(`unet`, `vae`, `tokenizer`, `noise_scheduler`, `family`, `source`, ...) that inherit these methods and
add their own text encoding, conditioning, pipeline and file layouts.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from difftune.models.base import count_parameters
from difftune.models.objectives import DDPMObjective


class LatentUNetModel:
    default_cfg_scale = 7.0
    """The guidance samples use unless sample.cfg_scale is set."""

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def notes(self) -> list[str]:
        return []

    def make_objective(self, train=None) -> DDPMObjective:
        """DDPM over the model's noise schedule; `train` (a TrainConfig) gives Min-SNR. The flow-matching
        settings do not apply to these models: setting one is an error rather than silently ignored."""
        if train is None:
            return DDPMObjective(self.noise_scheduler)
        from difftune.models.objectives import check_objective_settings

        check_objective_settings(train, "ddpm", self.family)
        return DDPMObjective(self.noise_scheduler, train.min_snr_gamma)

    def text_token_counts(self, captions: list[str]) -> tuple[list[int], int]:
        ids = self.tokenizer(captions, truncation=False, padding=False).input_ids
        return [len(i) for i in ids], self.tokenizer.model_max_length

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents of pixels in [-1, 1]; the distribution's mean without a generator (deterministic).
        The VAE runs in its own dtype (kept fp32 where its config asks, see Trainer._place_modules)."""
        return self.latents_from_distribution(*self.encode_latent_distribution(pixels), generator)

    @torch.no_grad()
    def encode_latent_distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution of pixels in [-1, 1]: (mean, std) in raw VAE space, in the VAE's
        dtype on its device; what the latent cache (data/latent_cache.py) stores."""
        return encode_distribution(self.vae, pixels)

    def latents_from_distribution(self, mean: torch.Tensor, std: torch.Tensor,
                                  generator: torch.Generator | None = None) -> torch.Tensor:
        """The denoiser's latents of a stored distribution: a sample (the mean without a generator), scaled."""
        return sample_distribution(mean, std, generator).float() * self.vae.config.scaling_factor

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return self.unet(noisy, t, **cond).sample

    def save_pretrained(self, path: Path, dtype: torch.dtype = torch.float32) -> None:
        pipe = self.pipeline("euler")
        pipe.scheduler = self.noise_scheduler  # the training schedule, as the folder was loaded
        if dtype != torch.float32:
            pipe = copy.deepcopy(pipe).to(dtype=dtype)  # convert copies, never the live training modules
        pipe.save_pretrained(str(path), safe_serialization=True)

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "prediction_type": self.prediction_type,
            "source": self.source,
            **{f"{role}_parameters": count_parameters(module) for role, module in self.parts.items()},
            "vae_scale_factor": self.vae_scale_factor,
        }


def encode_distribution(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of a diffusers AutoencoderKL's latent distribution, as its DiagonalGaussianDistribution
    holds them (std from the log-variance clamped to [-30, 20]); shared by every family's adapter base."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean, dist.std


def sample_distribution(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """`mean + std · ε`, ε drawn as diffusers' DiagonalGaussianDistribution.sample draws it (randn_tensor of
    the mean's shape and dtype, from `generator`, on the generator's device when that is the CPU), so a
    cached distribution samples exactly the latents encoding the image in the step would; the mean
    without a generator."""
    if generator is None:
        return mean
    from diffusers.utils.torch_utils import randn_tensor

    return mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
