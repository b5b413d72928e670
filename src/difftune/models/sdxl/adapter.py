"""SDXL adapter: two CLIP text encoders, a UNet with added text/size conditioning, DDPM epsilon or v.

Conditioning as SDXL was trained and as diffusers' pipeline and training scripts build it: the
penultimate hidden states of CLIP ViT-L (768) and OpenCLIP bigG (1280) concatenated to 2048 per token,
bigG's pooled projection, and `add_time_ids` = original size + crop top-left + target size of each
image (micro-conditioning, so the model learns what a crop or an upscaled small photo looks like).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from difftune.data.batch import Batch
from difftune.models.latent_unet import LatentUNetModel
from difftune.models.registry import FAMILIES
from difftune.models.sd.adapter import encode_clip
from difftune.models.sd.lora_presets import UNET_CLIP_PRESETS
from difftune.samplers import scheduler_class

TE1_PREFIX = "conditioner.embedders.0.transformer.text_model."
TE2_PREFIX = "conditioner.embedders.1.model."


@dataclass
class StableDiffusionXLModel(LatentUNetModel):
    family: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer | None
    tokenizer_2: CLIPTokenizer | None
    noise_scheduler: DDPMScheduler
    clip_skip: int = 1
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    text_encoder_roles = ("text_encoder", "text_encoder_2")
    kohya_prefixes = FAMILIES["sdxl"].kohya_prefixes  # declared once, in the registry line
    diffusers_prefixes = FAMILIES["sdxl"].diffusers_prefixes
    embedding_keys = FAMILIES["sdxl"].embedding_keys

    @property
    def tokenizers(self) -> dict[str, Any]:
        """Text-encoder role → its tokenizer (textual inversion adds its tokens to them)."""
        return {"text_encoder": self.tokenizer, "text_encoder_2": self.tokenizer_2}
    lora_presets = UNET_CLIP_PRESETS

    @property
    def parts(self) -> dict[str, torch.nn.Module]:
        return {"denoiser": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
                "vae": self.vae}

    @property
    def notes(self) -> list[str]:
        """Load-time warnings the trainer shows."""
        if self.clip_skip > 1:
            return [f"model.clip_skip = {self.clip_skip} has no effect on SDXL (as in kohya's SDXL scripts): SDXL "
                    "was trained on the penultimate layer of both text encoders, which difftune always uses"]
        return []

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        hidden_1, _ = encode_clip(self.text_encoder, self.tokenizer, captions, layer=-2, final_norm=False)
        hidden_2, out_2 = encode_clip(self.text_encoder_2, self.tokenizer_2, captions, layer=-2, final_norm=False)
        return {"encoder_hidden_states": torch.cat([hidden_1, hidden_2], dim=-1), "text_embeds": out_2.text_embeds}

    def condition(self, text: dict[str, torch.Tensor], batch: Batch) -> dict[str, Any]:
        sizes = [(*o, *c, *s) for o, c, s in zip(batch.original_sizes, batch.crop_top_lefts, batch.target_sizes,
                                                 strict=True)]
        hidden = text["encoder_hidden_states"]
        # float32 whatever the autocast dtype: bf16 would round a 1023-px side to 1024
        time_ids = torch.tensor(sizes, dtype=torch.float32, device=hidden.device)
        return {"encoder_hidden_states": hidden,
                "added_cond_kwargs": {"text_embeds": text["text_embeds"], "time_ids": time_ids}}

    def pipeline(self, sampler: str = "euler") -> StableDiffusionXLPipeline:
        pipe = StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet,
            scheduler=scheduler_class(sampler).from_config(self.noise_scheduler.config),
            force_zeros_for_empty_prompt=True, add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {}  # the penultimate layers, as trained

    def save_single_file(self, path: Path, dtype: torch.dtype = torch.float16, metadata: dict[str, str] | None = None) -> None:
        """The SGM layout A1111/Forge/ComfyUI load: `model.diffusion_model.`, `first_stage_model.`,
        `conditioner.embedders.0.transformer.text_model.` (CLIP-L) and `conditioner.embedders.1.model.` (bigG)."""
        from difftune.models.sd.ldm_export import (
            clip_to_ldm,
            open_clip_to_ldm,
            unet_to_ldm,
            vae_to_ldm,
            write_ldm_file,
        )

        tensors = {**unet_to_ldm(self.unet), **vae_to_ldm(self.vae), **clip_to_ldm(self.text_encoder, TE1_PREFIX),
                   **open_clip_to_ldm(self.text_encoder_2, TE2_PREFIX)}
        if self.prediction_type == "v_prediction":
            tensors["v_pred"] = torch.tensor([])  # the flag A1111/ComfyUI read (diffusers ignores it)
        write_ldm_file(path, tensors, dtype, metadata)

    @cached_property
    def _sgm_names(self):
        from difftune.models.sd.ldm_export import unet_key_renamer

        return unet_key_renamer(self.unet)

    def kohya_file_name(self, role: str, module_path: str) -> str | None:
        """kohya's SDXL LoRA files name UNet layers by the original SGM module paths
        (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`): what A1111/Forge read, and ComfyUI,
        kohya and diffusers read as well."""
        if role != "denoiser":
            return None
        sgm = self._sgm_names(module_path + ".weight").removesuffix(".weight")
        return f"{self.kohya_prefixes[role]}_{sgm.replace('.', '_')}"

    def lora_metadata(self) -> dict[str, str]:
        return {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False",
                "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
