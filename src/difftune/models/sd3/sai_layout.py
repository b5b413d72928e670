"""The single-file layout StabilityAI ships SD3/3.5 in (what ComfyUI and Forge load), written from
diffusers modules.

    model.diffusion_model.joint_blocks.N.{x_block,context_block}.…    the MMDiT (q, k, v fused into qkv)
    first_stage_model.…                                              the VAE (LDM names)
    text_encoders.clip_l.transformer.…  text_encoders.clip_g.transformer.…  text_encoders.t5xxl.transformer.…
                                                                     the encoders, in transformers' own names

diffusers reads this layout (`SD3Transformer2DModel.from_single_file`, its CLIP/T5 helpers) but has no
writer; the key map below is its inverse, derived from the transformer's config, and the tests read a
written file back with diffusers bit for bit.
"""

from __future__ import annotations

import torch

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
ENCODER_PREFIXES = {"text_encoder": CLIP_L_PREFIX, "text_encoder_2": CLIP_G_PREFIX, "text_encoder_3": T5_PREFIX}

_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
_FUSED = {"attn.to_": "x_block.attn.qkv", "attn.add_": "context_block.attn.qkv", "attn2.to_": "x_block.attn2.qkv"}
"""diffusers' separate projections (to_q, add_q_proj, ...) → the fused qkv they are cut from."""


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous splits its modulation as (scale, shift), SD3's original as (shift, scale)."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first])


def transformer_to_sai(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """SD3Transformer2DModel state dict → `model.diffusion_model.*` keys (any size, medium or large)."""
    state = dict(transformer.state_dict())
    last = transformer.config.num_layers - 1
    out: dict[str, torch.Tensor] = {}

    def take(ours: str, theirs: str, swap: bool = False) -> None:
        for kind in ("weight", "bias"):
            if f"{ours}.{kind}" in state:
                value = state.pop(f"{ours}.{kind}")
                out[f"{TRANSFORMER_PREFIX}{theirs}.{kind}"] = _swap_halves(value) if swap else value

    out[TRANSFORMER_PREFIX + "pos_embed"] = state.pop("pos_embed.pos_embed")
    for ours, theirs in _TOP.items():
        take(ours, theirs, swap=ours == "norm_out.linear")
    for i in range(transformer.config.num_layers):
        block = f"transformer_blocks.{i}."
        for ours, theirs in _BLOCK.items():
            take(block + ours, f"joint_blocks.{i}.{theirs}", swap=i == last and ours == "norm1_context.linear")
        for ours, theirs in _FUSED.items():
            suffixes = ("q", "k", "v") if ours.endswith("to_") else ("q_proj", "k_proj", "v_proj")
            for kind in ("weight", "bias"):
                parts = [block + ours + s + "." + kind for s in suffixes]
                if parts[0] in state:
                    out[f"{TRANSFORMER_PREFIX}joint_blocks.{i}.{theirs}.{kind}"] = torch.cat([state.pop(p) for p in parts])
    if state:
        raise ValueError(f"transformer weights with no SD3 single-file name: {sorted(state)[:5]}")
    return out


def encoder_to_sai(encoder: torch.nn.Module, role: str) -> dict[str, torch.Tensor]:
    """A text encoder under its SAI prefix, in transformers' names. T5's `encoder.embed_tokens` is the
    same tensor as `shared` and is left out (as the shipped files do; the loader ties it back)."""
    state = encoder.state_dict()
    return {ENCODER_PREFIXES[role] + k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}
