"""Built-in tiny, randomly initialised SD3.5 architecture (`tiny-sd3`) for tests and CPU benchmarks.

It has what makes SD3.5 SD3.5 at a size that trains on a CPU: an MMDiT with joint (image + text)
attention, SD3.5-medium's dual attention in its first block and RMS q/k norms; a CLIP-L-like encoder
(32 wide, its pooled output unprojected: an identity projection, as SD3's tools read CLIP-L) and a
CLIP-G-like one (48 wide, a real projection), both over the byte-level tokenizer; a character-level T5
(96 wide, the joint attention width, so the two CLIPs' 80 features are zero-padded as in SD3); a
16-channel VAE with SD3's shift and scale. Weights come from a fixed seed, so every build is identical.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from difftune.models.clip_tokenizers import BYTE_LEVEL_VOCAB_SIZE, byte_level_clip_tokenizer
from difftune.models.sd3.adapter import MAX_SEQUENCE_LENGTH
from difftune.models.t5_text import tiny_t5_encoder, tiny_t5_tokenizer

CLIP_L_DIM = 32
CLIP_G_DIM = 48  # wider than the first: diffusers tells the two CLIPs of a single file apart by width
T5_DIM = 96  # = joint_attention_dim; more than CLIP_L_DIM + CLIP_G_DIM, which are zero-padded to it
SD3_SHIFT = 3.0
BUILTIN_MODELS = ("tiny-sd3",)


def tiny_transformer(sample_size: int = 16) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_DIM,
        caption_projection_dim=16,  # = heads x head dim: text and image tokens attend jointly
        pooled_projection_dim=CLIP_L_DIM + CLIP_G_DIM, pos_embed_max_size=32,
        dual_attention_layers=(0,), qk_norm="rms_norm",
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=16, norm_num_groups=16, sample_size=32,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )


def _clip_config(width: int, layers: int, act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=BYTE_LEVEL_VOCAB_SIZE, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=width, hidden_act=act,
        bos_token_id=BYTE_LEVEL_VOCAB_SIZE - 2, eos_token_id=BYTE_LEVEL_VOCAB_SIZE - 1,
        pad_token_id=BYTE_LEVEL_VOCAB_SIZE - 1,
    )


def tiny_text_encoders() -> tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection]:
    clip_l = CLIPTextModelWithProjection(_clip_config(CLIP_L_DIM, 2, "quick_gelu"))
    clip_g = CLIPTextModelWithProjection(_clip_config(CLIP_G_DIM, 3, "gelu"))
    if not clip_l.text_projection.weight.is_meta:
        with torch.no_grad():
            clip_l.text_projection.weight.copy_(torch.eye(CLIP_L_DIM))
    return clip_l, clip_g


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SD3_SHIFT)


def build_tiny_components(use_t5: bool = True) -> dict:
    """Components of `tiny-sd3`, identical on every call (fixed seed); T5 is always drawn, so the other
    parts do not depend on use_t5."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip_l, clip_g = tiny_text_encoders()
        t5 = tiny_t5_encoder(width=T5_DIM, layers=2)
        components = {"transformer": tiny_transformer(), "vae": tiny_vae(), "text_encoder": clip_l,
                      "text_encoder_2": clip_g}
    for module in (*components.values(), t5):
        module.eval()  # as from_pretrained leaves them: T5's dropout would make the text embedding random
    components.update(tokenizer=byte_level_clip_tokenizer(), tokenizer_2=byte_level_clip_tokenizer(),
                      scheduler=flow_scheduler(), text_encoder_3=t5 if use_t5 else None,
                      tokenizer_3=tiny_t5_tokenizer(MAX_SEQUENCE_LENGTH) if use_t5 else None)
    return components
