"""Stable Diffusion 1.x / 2.x adapter (epsilon and v-prediction) over diffusers components."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

SAMPLERS = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "ddpm": DDPMScheduler,
}


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@dataclass
class StableDiffusionModel:
    """SD1.x/2.x: one CLIP text encoder, a cross-attention UNet, a KL VAE."""

    family: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    clip_skip: int = 1
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.noise_scheduler.config.num_train_timesteps

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder]

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        if self.clip_skip > 1:
            # kohya's clip_skip: take an earlier layer, then the final layer norm as SD expects.
            out = self.text_encoder(ids, output_hidden_states=True)
            # transformers 5 dropped the `text_model` wrapper; older versions have it.
            final_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
            hidden = final_norm(out.hidden_states[-self.clip_skip])
        else:
            hidden = self.text_encoder(ids)[0]
        return {"encoder_hidden_states": hidden}

    def text_token_counts(self, captions: list[str]) -> tuple[list[int], int]:
        """Tokens of each caption (with start/end tokens) and how many the text encoder reads."""
        ids = self.tokenizer(captions, truncation=False, padding=False).input_ids
        return [len(i) for i in ids], self.tokenizer.model_max_length

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents of pixels in [-1, 1]. Without a generator the distribution's mean is used (deterministic)."""
        dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        latents = dist.mean if generator is None else dist.sample(generator=generator)
        return latents.float() * self.vae.config.scaling_factor

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.unet(noisy, timesteps, **conditioning).sample

    def loss_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        return alphas_cumprod / (1.0 - alphas_cumprod)

    def pipeline(self, sampler: str = "euler") -> StableDiffusionPipeline:
        scheduler = SAMPLERS[sampler].from_config(self.noise_scheduler.config)
        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_pretrained(self, path: Path, dtype: torch.dtype = torch.float32) -> None:
        pipe = self.pipeline("euler")
        pipe.scheduler = self.noise_scheduler
        if dtype != torch.float32:
            # Convert copies, never the live training modules.
            pipe = copy.deepcopy(pipe).to(dtype=dtype)
        pipe.save_pretrained(str(path), safe_serialization=True)

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "prediction_type": self.prediction_type,
            "source": self.source,
            "unet_parameters": count_parameters(self.unet),
            "text_encoder_parameters": count_parameters(self.text_encoder),
            "vae_parameters": count_parameters(self.vae),
            "vae_scale_factor": self.vae_scale_factor,
        }
