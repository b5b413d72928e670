"""Flux.1 adapter (dev and schnell): CLIP-L pooled + T5 sequence text, a flow-matching transformer over
2x2-packed 16-channel latents, rectified-flow velocity targets.

Conditioning as diffusers' FluxPipeline builds it (and kohya's Flux scripts train it): CLIP-L's
`pooler_output` (`pooled_projections`), T5's last hidden states over `max_sequence_length` tokens
(`encoder_hidden_states`: 512 for dev, 256 for schnell), text position ids of zeros, image position ids
(0, row, column) per 2x2 patch, the timestep as σ (the pipeline passes timestep / 1000), and for dev
the distilled guidance as a float32 tensor per sample (`train.guidance_scale`, 1.0 by default as kohya
and diffusers' scripts train). The packing happens inside `predict`, so the rest of difftune sees
(B, 16, h, w) latents and gets the velocity back in that layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from difftune.data.batch import Batch
from difftune.models.flow_transformer import FlowTransformerModel
from difftune.models.flux.bfl_layout import KOHYA_LAYOUT, diffusers_to_bfl
from difftune.models.flux.lora_presets import FLUX_PRESETS
from difftune.models.registry import FAMILIES
from difftune.models.t5_text import encode_t5

T5_TOKENS = {"flux-dev": 512, "flux-schnell": 256}
"""T5 tokens the pipelines read (FluxPipeline's max_sequence_length: 512 for dev, 256 for schnell)."""


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h/2 · w/2, 4C): FluxPipeline._pack_latents (2x2 patches, channels first)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of pack_latents (FluxPipeline._unpack_latents, in latent pixels)."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, h, w)


def latent_image_ids(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(h/2 · w/2, 3) position ids (0, row, column) of the packed patches: FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device)


@dataclass
class FluxModel(FlowTransformerModel):
    family: str
    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    tokenizer: Any
    tokenizer_2: Any
    scheduler: FlowMatchEulerDiscreteScheduler
    max_sequence_length: int = 512
    clip_skip: int = 1
    source: str = ""
    guidance_scale: float = 1.0
    """Flux.1-dev's distilled guidance during training (train.guidance_scale, set by make_objective)."""
    sample_size: int | None = None
    """Default sample side in pixels when it is not Flux's 1024 (the tiny models)."""
    extra: dict[str, Any] = field(default_factory=dict)

    default_timestep_sampling = "flux_shift"
    text_encoder_roles = ("text_encoder", "text_encoder_2")
    kohya_prefixes = FAMILIES["flux"].kohya_prefixes  # declared once, in the registry line
    diffusers_prefixes = FAMILIES["flux"].diffusers_prefixes
    frozen_text_encoder_roles = FAMILIES["flux"].frozen_text_encoders  # T5-XXL
    lora_presets = FLUX_PRESETS
    kohya_file_layout = KOHYA_LAYOUT
    """LoRA files in kohya's Flux layout (BFL names, fused q/k/v); see checkpoint/lora_formats.file_layout."""

    @property
    def parts(self) -> dict[str, torch.nn.Module]:
        return {"denoiser": self.transformer, "text_encoder": self.text_encoder,
                "text_encoder_2": self.text_encoder_2, "vae": self.vae}

    @property
    def has_guidance(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    @property
    def default_cfg_scale(self) -> float:
        """Flux.1-dev samples at its distilled guidance 3.5 (FluxPipeline's default); schnell ignores it."""
        return 3.5 if self.has_guidance else 0.0

    @property
    def native_resolution(self) -> int:
        return self.sample_size or super().native_resolution

    @property
    def notes(self) -> list[str]:
        notes = []
        if self.clip_skip > 1:
            notes.append(f"model.clip_skip = {self.clip_skip} has no effect on Flux: it reads CLIP-L's pooled output and "
                         "T5's last layer, as it was trained")
        if getattr(self, "guidance_ignored", False):
            notes.append(f"train.guidance_scale = {self.guidance_scale} has no effect on {self.family}: schnell has no "
                         "guidance embedding")
        return notes

    def make_objective(self, train=None):
        """The flow objective; also where a training config reaches the family: dev's guidance value is
        taken from train.guidance_scale."""
        if train is not None:
            self.guidance_scale = float(train.guidance_scale)
            self.guidance_ignored = not self.has_guidance and train.guidance_scale != 1.0
        return super().make_objective(train)

    def longest_reading_tokenizer(self):
        return self.tokenizer_2, self.max_sequence_length

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.text_encoder.device)
        pooled = self.text_encoder(ids, output_hidden_states=False).pooler_output
        hidden = encode_t5(self.text_encoder_2, self.tokenizer_2, captions, self.max_sequence_length)
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    def condition(self, text: dict[str, torch.Tensor], batch: Batch) -> dict[str, Any]:
        hidden = text["encoder_hidden_states"]
        cond = {**text, "txt_ids": torch.zeros(hidden.shape[1], 3, device=hidden.device)}
        if self.has_guidance:
            # float32 whatever the autocast dtype, as the pipeline builds it
            cond["guidance"] = torch.full((hidden.shape[0],), self.guidance_scale, dtype=torch.float32,
                                          device=hidden.device)
        return cond

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        _, _, h, w = noisy.shape
        velocity = self.transformer(
            hidden_states=pack_latents(noisy), timestep=t, img_ids=latent_image_ids(h, w, noisy.device),
            return_dict=False, **cond)[0]
        return unpack_latents(velocity, h, w)

    def pipeline(self, sampler: str = "euler") -> FluxPipeline:
        pipe = FluxPipeline(scheduler=self.sampling_scheduler(sampler), vae=self.vae, text_encoder=self.text_encoder,
                            tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
                            transformer=self.transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}

    def save_single_file(self, path: Path, dtype: torch.dtype = torch.bfloat16, metadata: dict[str, str] | None = None) -> None:
        """The transformer alone in BFL's layout (`double_blocks.N.img_attn.qkv.weight`, ...): what ComfyUI
        loads as a diffusion model / Forge as a Flux UNet; the text encoders and VAE stay separate files."""
        from difftune.models.sd.ldm_export import write_ldm_file

        write_ldm_file(path, diffusers_to_bfl(self.transformer.state_dict()), dtype, metadata)

    def lora_metadata(self) -> dict[str, str]:
        variant = "schnell" if self.family.endswith("schnell") else "dev"
        return {"ss_base_model_version": "flux1", "ss_v2": "False", "ss_network_module": "networks.lora_flux",
                "modelspec.architecture": f"flux-1-{variant}/lora"}
