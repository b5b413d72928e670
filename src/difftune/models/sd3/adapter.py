"""SD3/3.5 adapter: CLIP-L + CLIP-G + optional T5-XXL, an MMDiT transformer, rectified flow.

Conditioning exactly as diffusers' StableDiffusion3Pipeline.encode_prompt builds it: the penultimate
hidden states of CLIP-L (768) and CLIP-G (1280) side by side, zero-padded to T5's width (4096), then
T5's last hidden states (256 tokens) after them on the sequence axis; without T5 (`model.use_t5 =
false`) its part is zeros of the same shape, as the pipeline does with `text_encoder_3=None`. The pooled
embedding is both CLIPs' `text_embeds` side by side (CLIP-L's projection is the identity in SD3). The
transformer takes the timestep 1000·σ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from difftune.data.batch import Batch
from difftune.models.flow_transformer import FlowTransformerModel
from difftune.models.registry import FAMILIES
from difftune.models.sd.adapter import encode_clip
from difftune.models.sd3.lora_presets import SD3_PRESETS
from difftune.models.t5_text import encode_t5

MAX_SEQUENCE_LENGTH = 256
"""T5 tokens of the prompt embedding: diffusers' SD3 pipeline and training script default (kohya's too)."""
T5_ROLE = "text_encoder_3"
BASE_MODEL_VERSIONS = {"sd3": "sd3_medium", "sd3.5-medium": "sd3.5_medium", "sd3.5-large": "sd3.5_large"}
MODELSPEC_ARCHITECTURES = {"sd3": "stable-diffusion-3-medium", "sd3.5-medium": "stable-diffusion-3-5-medium",
                           "sd3.5-large": "stable-diffusion-3-5-large"}
"""kohya's names (library/sai_model_spec.py: "stable-diffusion-3-" + its model type medium / 5-medium / 5-large)."""
KOHYA_DENOISER_PREFIX = "lora_transformer"


@dataclass
class StableDiffusion3Model(FlowTransformerModel):
    family: str
    transformer: SD3Transformer2DModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModelWithProjection
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer | None
    tokenizer_2: CLIPTokenizer | None
    scheduler: FlowMatchEulerDiscreteScheduler
    text_encoder_3: torch.nn.Module | None = None
    tokenizer_3: Any = None
    clip_skip: int = 1
    source: str = ""
    load_notes: list[str] = field(default_factory=list)

    kohya_prefixes = FAMILIES["sd3"].kohya_prefixes  # declared once, in the registry line
    diffusers_prefixes = FAMILIES["sd3"].diffusers_prefixes
    frozen_text_encoder_roles = FAMILIES["sd3"].frozen_text_encoders  # T5-XXL
    lora_presets = SD3_PRESETS
    max_sequence_length = MAX_SEQUENCE_LENGTH

    @property
    def text_encoder_roles(self) -> tuple[str, ...]:
        return ("text_encoder", "text_encoder_2") + ((T5_ROLE,) if self.text_encoder_3 is not None else ())

    @property
    def parts(self) -> dict[str, torch.nn.Module]:
        parts = {"denoiser": self.transformer, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        if self.text_encoder_3 is not None:
            parts[T5_ROLE] = self.text_encoder_3
        return {**parts, "vae": self.vae}

    @property
    def notes(self) -> list[str]:
        notes = list(self.load_notes)
        if self.clip_skip > 1:
            notes.append(f"model.clip_skip = {self.clip_skip} has no effect on SD3: it was trained on the penultimate "
                         "layer of both CLIP encoders, which difftune always uses")
        return notes

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        hidden_l, out_l = encode_clip(self.text_encoder, self.tokenizer, captions, layer=-2, final_norm=False)
        hidden_g, out_g = encode_clip(self.text_encoder_2, self.tokenizer_2, captions, layer=-2, final_norm=False)
        clip = torch.cat([hidden_l, hidden_g], dim=-1)
        if self.text_encoder_3 is not None:
            t5 = encode_t5(self.text_encoder_3, self.tokenizer_3, captions, self.max_sequence_length).to(clip.device)
        else:
            t5 = torch.zeros(len(captions), self.max_sequence_length, self.transformer.config.joint_attention_dim,
                             device=clip.device, dtype=clip.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2),
                "pooled_projections": torch.cat([out_l.text_embeds, out_g.text_embeds], dim=-1)}

    def condition(self, text: dict[str, torch.Tensor], batch: Batch) -> dict[str, Any]:
        return dict(text)  # SD3 conditions on the text alone

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return self.transformer(hidden_states=noisy, timestep=t * 1000.0, return_dict=False, **cond)[0]

    def longest_reading_tokenizer(self):
        if self.text_encoder_3 is not None:
            return self.tokenizer_3, self.max_sequence_length
        return self.tokenizer, self.tokenizer.model_max_length

    def pipeline(self, sampler: str = "euler") -> StableDiffusion3Pipeline:
        pipe = StableDiffusion3Pipeline(
            transformer=self.transformer, scheduler=self.sampling_scheduler(sampler), vae=self.vae,
            text_encoder=self.text_encoder, tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2, text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}

    def save_single_file(self, path: Path, dtype: torch.dtype = torch.float16, metadata: dict[str, str] | None = None) -> None:
        """StabilityAI's layout (ComfyUI, Forge): `model.diffusion_model.` (the MMDiT), `first_stage_model.`,
        `text_encoders.clip_l/clip_g/t5xxl.transformer.` (models/sd3/sai_layout.py)."""
        from difftune.models.sd.ldm_export import vae_to_ldm, write_ldm_file
        from difftune.models.sd3.sai_layout import encoder_to_sai, transformer_to_sai

        tensors = {**transformer_to_sai(self.transformer), **vae_to_ldm(self.vae)}
        for role in self.text_encoder_roles:
            tensors.update(encoder_to_sai(self.parts[role], role))
        write_ldm_file(path, tensors, dtype, metadata)

    def kohya_file_name(self, role: str, module_path: str) -> str | None:
        """Transformer layers as `lora_transformer_<diffusers path with _>`: the names ComfyUI maps for SD3
        (comfy/lora.py, OneTrainer's layout). kohya's own `lora_unet_joint_blocks_N_x_block_attn_qkv` names
        the fused qkv of SAI's model, which diffusers' separate to_q/to_k/to_v cannot be written as."""
        if role != "denoiser":
            return None
        return f"{KOHYA_DENOISER_PREFIX}_{module_path.replace('.', '_')}"

    def lora_metadata(self) -> dict[str, str]:
        return {"ss_base_model_version": BASE_MODEL_VERSIONS.get(self.family, self.family), "ss_v2": "False",
                "ss_network_module": "networks.lora_sd3",
                "modelspec.architecture": MODELSPEC_ARCHITECTURES.get(self.family, f"difftune-{self.family}") + "/lora"}
