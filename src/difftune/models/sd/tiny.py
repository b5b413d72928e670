"""Built-in tiny, randomly initialised Stable Diffusion architectures for tests and the demo.

They follow the SD1.x layout (CLIP text encoder, cross-attention UNet, KL VAE) at a size that trains
on a CPU in minutes: a 2x VAE, a two-level UNet, and a 2-layer CLIP text encoder over a byte-level
tokenizer. Weights come from a fixed seed, so every build is identical.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from difftune.models.clip_tokenizers import BYTE_LEVEL_VOCAB_SIZE, byte_level_clip_tokenizer

TINY_TEXT_DIM = 32

# Built-in name → prediction type.
BUILTIN_MODELS = {"tiny-sd": "epsilon", "tiny-sd-v": "v_prediction"}


def tiny_unet(sample_size: int = 16) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )


def tiny_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=BYTE_LEVEL_VOCAB_SIZE,
            hidden_size=TINY_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=TINY_TEXT_DIM,
            bos_token_id=BYTE_LEVEL_VOCAB_SIZE - 2,
            eos_token_id=BYTE_LEVEL_VOCAB_SIZE - 1,
            pad_token_id=BYTE_LEVEL_VOCAB_SIZE - 1,
        )
    )


def sd_noise_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """The training noise schedule of SD1.x/2.x (scaled-linear betas, 1000 steps)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        steps_offset=1,
        clip_sample=False,
    )


def build_tiny_components(name: str) -> dict:
    """Components of a built-in tiny model, identical on every call (fixed seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        components = {
            "unet": tiny_unet(),
            "vae": tiny_vae(),
            "text_encoder": tiny_text_encoder(),
        }
    components["tokenizer"] = byte_level_clip_tokenizer()
    components["noise_scheduler"] = sd_noise_scheduler(BUILTIN_MODELS[name])
    return components
