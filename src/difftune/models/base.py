"""The narrow interface the trainer, validation and the LR finder use to talk to a model family.

The loop never touches family-specific details (text-encoder count, added conditioning, prediction
type): it calls `encode_prompts`, `encode_images`, `predict` and `loss_target`. SDXL, SD3 and Flux
adapters implement the same protocol later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class DiffusionModel(Protocol):
    """A loaded model family, its trainable parts, and the diffusion maths it needs."""

    family: str
    """Short family name, e.g. "sd1", "sd2", "sd2-v", "tiny-sd"."""
    prediction_type: str
    """"epsilon" or "v_prediction"."""
    num_train_timesteps: int
    unet: nn.Module
    text_encoders: list[nn.Module]
    vae: nn.Module

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning as keyword arguments for `predict` (grad flows if a text encoder trains)."""
        ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], shape (B, 3, H, W) → scaled latents (no grad)."""
        ...

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        """The UNet's raw prediction."""
        ...

    def loss_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio per timestep (for Min-SNR weighting)."""
        ...

    def pipeline(self, sampler: str = "euler") -> Any:
        """A diffusers pipeline over the live modules, for sample images."""
        ...

    def save_pretrained(self, path: Path, dtype: torch.dtype = torch.float32) -> None:
        """Write a diffusers folder that `DiffusionPipeline.from_pretrained` loads."""
        ...

    def describe(self) -> dict[str, Any]:
        """Facts for doctor and summary.json (family, prediction type, parameter counts, source)."""
        ...
