"""Built-in tiny, randomly initialised SDXL architecture (`tiny-sdxl`) for tests and CPU benchmarks.

It has what makes SDXL SDXL at a size that trains on a CPU: two text encoders (a CLIP-L-like and a
bigG-like one with a projection, each 32 wide, over the byte-level tokenizer), a UNet with
`addition_embed_type = "text_time"` (pooled text + size embedding), no attention in its first down
block and two transformer blocks per attention in its second (SDXL's depth > 1), linear projections.
Weights come from a fixed seed, so every build is identical.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from difftune.models.clip_tokenizers import BYTE_LEVEL_VOCAB_SIZE, byte_level_clip_tokenizer
from difftune.models.sd.tiny import sd_noise_scheduler, tiny_vae

TEXT_DIM = 32
TEXT_DIM_2 = 48  # wider than the first, as bigG is wider than ViT-L (diffusers tells the two apart by width)
TIME_EMBED_DIM = 8
BUILTIN_MODELS = {"tiny-sdxl": "epsilon"}


def tiny_sdxl_unet(sample_size: int = 16) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=TEXT_DIM + TEXT_DIM_2,  # the two encoders' hidden states, concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_DIM_2,  # 6 size numbers + pooled text
        norm_num_groups=32,
    )


def _text_config(width: int, layers: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=BYTE_LEVEL_VOCAB_SIZE, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=width, hidden_act="gelu",
        bos_token_id=BYTE_LEVEL_VOCAB_SIZE - 2, eos_token_id=BYTE_LEVEL_VOCAB_SIZE - 1,
        pad_token_id=BYTE_LEVEL_VOCAB_SIZE - 1,
    )


def tiny_text_encoders() -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    return CLIPTextModel(_text_config(TEXT_DIM, 2)), CLIPTextModelWithProjection(_text_config(TEXT_DIM_2, 3))


def build_tiny_components(name: str) -> dict:
    """Components of `tiny-sdxl`, identical on every call (fixed seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder, text_encoder_2 = tiny_text_encoders()
        components = {"unet": tiny_sdxl_unet(), "vae": tiny_vae(), "text_encoder": text_encoder,
                      "text_encoder_2": text_encoder_2}
    components["tokenizer"] = byte_level_clip_tokenizer()
    components["tokenizer_2"] = byte_level_clip_tokenizer()
    components["noise_scheduler"] = sd_noise_scheduler(BUILTIN_MODELS[name])
    return components
