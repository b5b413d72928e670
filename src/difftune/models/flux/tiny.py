"""Built-in tiny, randomly initialised Flux.1 architectures (`tiny-flux`, dev-like with the guidance
embedding, and `tiny-flux-schnell`, without) for tests and CPU runs.

What makes Flux Flux, at a size that trains on a CPU: one double-stream and one single-stream block
(2 heads of 8, rotary axes 2+2+4), 64 input channels from 2x2 patches of a 16-channel VAE latent with a
shift and scale factor, a CLIP-L-like encoder (pooled output, 32 wide, byte-level tokenizer) and a tiny
T5 encoder (sequence, 32 wide, character tokenizer). Weights come from a fixed seed, so every build
is identical.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from difftune.models.clip_tokenizers import byte_level_clip_tokenizer
from difftune.models.sd.tiny import TINY_TEXT_DIM, tiny_text_encoder
from difftune.models.t5_text import tiny_t5_encoder, tiny_t5_tokenizer

BUILTIN_MODELS = {"tiny-flux": True, "tiny-flux-schnell": False}
"""Built-in name → whether it has dev's guidance embedding."""
TINY_T5_TOKENS = 64
TINY_RESOLUTION = 32
"""The tiny models' default sample size in pixels (Flux's own default, 1024, is far too slow here)."""


def tiny_flux_transformer(guidance: bool = True) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TINY_TEXT_DIM, pooled_projection_dim=TINY_TEXT_DIM,
        guidance_embeds=guidance, axes_dims_rope=(2, 2, 4),
    )


def tiny_flux_vae() -> AutoencoderKL:
    """A 2x VAE with Flux's 16 latent channels, shift and scale, and no quant convolutions."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=16, norm_num_groups=16, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def flux_scheduler(dev: bool) -> FlowMatchEulerDiscreteScheduler:
    """Flux.1-dev's resolution-shifted flow schedule, or schnell's unshifted one (as their repos ship)."""
    if dev:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                               base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                               max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def tiny_modules(name: str) -> dict[str, torch.nn.Module]:
    guidance = BUILTIN_MODELS[name]
    return {"transformer": tiny_flux_transformer(guidance), "vae": tiny_flux_vae(),
            "text_encoder": tiny_text_encoder(), "text_encoder_2": tiny_t5_encoder(width=TINY_TEXT_DIM)}


def build_tiny_components(name: str) -> dict:
    """Components of a built-in tiny Flux, identical on every call (fixed seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        components = tiny_modules(name)
    for module in components.values():
        module.eval()  # as from_pretrained gives them: the tiny T5's dropout would make outputs random
    components["tokenizer"] = byte_level_clip_tokenizer()
    components["tokenizer_2"] = tiny_t5_tokenizer(TINY_T5_TOKENS)
    components["scheduler"] = flux_scheduler(BUILTIN_MODELS[name])
    return components
