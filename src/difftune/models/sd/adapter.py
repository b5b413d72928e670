"""Stable Diffusion 1.x / 2.x adapter (epsilon and v-prediction) over diffusers components."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from difftune.data.batch import Batch
from difftune.models.clip_tokenizers import expand_multi_vector_tokens
from difftune.models.latent_unet import LatentUNetModel
from difftune.models.registry import FAMILIES
from difftune.models.sd.lora_presets import UNET_CLIP_PRESETS
from difftune.samplers import scheduler_class

BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sd2-v": "sd_v2_v"}
"""kohya's ss_base_model_version (A1111 reads it to group LoRAs by base)."""
MODELSPEC_ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sd2-v": "stable-diffusion-v2-768-v"}


def encode_clip(text_encoder, tokenizer, captions: list[str], layer: int | None = None,
                final_norm: bool = True) -> tuple[torch.Tensor, Any]:
    """Token hidden states of a CLIP text encoder (padded to its max length) and its raw output.

    `layer`: take `hidden_states[layer]` instead of the last layer's output (kohya's clip_skip, SDXL's
    penultimate layer); `final_norm` applies the final layer norm to it as SD 1.x expects.
    """
    captions = expand_multi_vector_tokens(tokenizer, captions)  # textual inversion's token_1 ... token_n
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    if layer is None:
        out = text_encoder(ids)
        return out[0], out
    out = text_encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[layer]
    if final_norm:
        # transformers 5 dropped the `text_model` wrapper; older versions have it.
        hidden = getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)
    return hidden, out


@dataclass
class StableDiffusionModel(LatentUNetModel):
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

    text_encoder_roles = ("text_encoder",)
    kohya_prefixes = FAMILIES["sd"].kohya_prefixes  # declared once, in the registry line
    diffusers_prefixes = FAMILIES["sd"].diffusers_prefixes
    embedding_keys = FAMILIES["sd"].embedding_keys

    @property
    def tokenizers(self) -> dict[str, Any]:
        """Text-encoder role → its tokenizer (textual inversion adds its tokens to them)."""
        return {"text_encoder": self.tokenizer}
    lora_presets = UNET_CLIP_PRESETS

    @property
    def parts(self) -> dict[str, torch.nn.Module]:
        return {"denoiser": self.unet, "text_encoder": self.text_encoder, "vae": self.vae}

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        # kohya's clip_skip: an earlier layer, then the final layer norm as SD expects.
        layer = -self.clip_skip if self.clip_skip > 1 else None
        hidden, _ = encode_clip(self.text_encoder, self.tokenizer, captions, layer)
        return {"encoder_hidden_states": hidden}

    def condition(self, text: dict[str, torch.Tensor], batch: Batch) -> dict[str, Any]:
        return text  # SD 1.x/2.x condition on the text alone

    def pipeline(self, sampler: str = "euler") -> StableDiffusionPipeline:
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=scheduler_class(sampler).from_config(self.noise_scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Extra arguments of the pipeline's call (diffusers counts clip_skip from 0, kohya from 1)."""
        return {"clip_skip": self.clip_skip - 1 or None}

    def save_single_file(self, path: Path, dtype: torch.dtype = torch.float16, metadata: dict[str, str] | None = None) -> None:
        from difftune.models.sd.ldm_export import save_single_file

        save_single_file(path, self.unet, self.vae, self.text_encoder, dtype=dtype, metadata=metadata)

    def lora_metadata(self) -> dict[str, str]:
        return {
            "ss_base_model_version": BASE_MODEL_VERSIONS.get(self.family, self.family),
            "ss_v2": str(self.family.startswith("sd2")),
            "modelspec.architecture": MODELSPEC_ARCHITECTURES.get(self.family, f"difftune-{self.family}") + "/lora",
        }
