"""What every family difftune trains does the same way around its VAE and its pipeline folder.

`LatentUNetModel` (SD, SDXL) and `FlowTransformerModel` (Flux, SD3) inherit this; each says only how its
latents are scaled (`latents_from_distribution`) and which scheduler the saved folder gets
(`training_scheduler`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from difftune.models.base import count_parameters


class VAELatentModel:
    @property
    def device(self) -> torch.device:
        return self.parts["denoiser"].device

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def notes(self) -> list[str]:
        return []

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents of pixels in [-1, 1]; the distribution's mean without a generator (deterministic).
        The VAE runs in its own dtype (kept fp32 where its config asks, see training/memory)."""
        return self.latents_from_distribution(*self.encode_latent_distribution(pixels), generator)

    @torch.no_grad()
    def encode_latent_distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution of pixels in [-1, 1]: (mean, std) in raw VAE space, in the VAE's
        dtype on its device; what the latent cache (data/latent_cache.py) stores."""
        return encode_distribution(self.vae, pixels)

    def save_pretrained(self, path: Path, dtype: torch.dtype = torch.float32) -> None:
        pipe = self.pipeline("euler")
        pipe.scheduler = self.training_scheduler  # the training schedule, as the folder was loaded
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
