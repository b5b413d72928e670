"""Write a Stable Diffusion 1.x/2.x (and, with SDXL's text-encoder prefixes, SDXL) model as one
.safetensors in the original (LDM/SGM) layout.

That layout is what A1111/Forge and ComfyUI load as a "checkpoint". diffusers reads it
(`from_single_file`) but has no writer, so the key mapping is written here, derived from the model's
config rather than a fixed table, so any SD-layout UNet/VAE (including the tiny test models) maps.
The inverse of this module is diffusers' own loader, which the tests use to check a round trip.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from difftune.checkpoint.atomic import atomic_path

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."
OPEN_CLIP = "cond_stage_model.model."

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_key_renamer(unet: torch.nn.Module):
    """A function from a diffusers UNet key (`down_blocks.1.attentions.0.proj_in.weight`) to its LDM/SGM
    key without the `model.diffusion_model.` prefix (`input_blocks.4.1.proj_in.weight`)."""
    config = unet.config
    per_block = config.layers_per_block
    renames: list[tuple[str, str]] = [
        ("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
        ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
        # SDXL's added (pooled text + size) embedding
        ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
    ]
    for i in range(len(config.block_out_channels)):
        for j in range(per_block):
            slot = 1 + i * (per_block + 1) + j
            renames += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{slot}.0."),
                        (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{slot}.1.")]
        renames.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (per_block + 1)}.0.op."))
        for j in range(per_block + 1):
            slot = i * (per_block + 1) + j
            renames += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{slot}.0."),
                        (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{slot}.1.")]
        has_attention = config.up_block_types[i].startswith("CrossAttn")
        upsampler_slot = (i + 1) * (per_block + 1) - 1
        renames.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{upsampler_slot}.{2 if has_attention else 1}."))

    def rename(key: str) -> str:
        new = _rename_prefix(key, renames)
        if ".resnets." in key or key.startswith("mid_block.resnets"):
            new = _rename_inner(new, _RESNET)
        return new

    return rename


def unet_to_ldm(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel state dict → `model.diffusion_model.*` keys."""
    rename = unet_key_renamer(unet)
    return {UNET + rename(key): value for key, value in unet.state_dict().items()}


def vae_to_ldm(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """AutoencoderKL state dict → `first_stage_model.*` keys (attention linears become 1x1 convs)."""
    blocks = len(vae.config.block_out_channels)
    renames: list[tuple[str, str]] = [
        ("encoder.mid_block.resnets.0.", "encoder.mid.block_1."), ("encoder.mid_block.resnets.1.", "encoder.mid.block_2."),
        ("encoder.mid_block.attentions.0.", "encoder.mid.attn_1."),
        ("decoder.mid_block.resnets.0.", "decoder.mid.block_1."), ("decoder.mid_block.resnets.1.", "decoder.mid.block_2."),
        ("decoder.mid_block.attentions.0.", "decoder.mid.attn_1."),
        ("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out."),
    ]
    for i in range(blocks):
        renames += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                    (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                    (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{blocks - 1 - i}.block."),
                    (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{blocks - 1 - i}.upsample.")]
    out = {}
    for key, value in vae.state_dict().items():
        new = _rename_prefix(key, renames)
        if ".attn_1." in new:
            new = _rename_inner(new, _VAE_ATTENTION)
            if value.ndim == 2:  # the original VAE attention uses 1x1 convolutions
                value = value[:, :, None, None]
        else:
            new = _rename_inner(new, _VAE_RESNET)
        out[VAE + new] = value
    return out


def clip_to_ldm(text_encoder: torch.nn.Module, prefix: str = CLIP) -> dict[str, torch.Tensor]:
    """CLIP (OpenAI) text encoder → `<prefix>*` keys (SD 1.x: `cond_stage_model.transformer.text_model.`)."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        key = key.removeprefix("text_model.")  # transformers < 5.6 wraps the modules in `text_model`
        out[prefix + key] = value
    return out


def open_clip_to_ldm(text_encoder: torch.nn.Module, prefix: str = OPEN_CLIP) -> dict[str, torch.Tensor]:
    """OpenCLIP text encoder → `<prefix>*` keys (q/k/v fused into in_proj; SD 2.x: `cond_stage_model.model.`,
    SDXL's second encoder: `conditioner.embedders.1.model.` with its `text_projection`).

    diffusers drops OpenCLIP's last layer (SD 2.x uses the penultimate one); the file carries the
    layers the model has, which is what diffusers and ComfyUI read back.
    """
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {
        prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in state:  # OpenCLIP multiplies x @ proj; a Linear stores proj transposed
        out[prefix + "text_projection"] = state.pop("text_projection.weight").T.contiguous()
    state.pop("embeddings.position_ids", None)
    inner = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for layer in range(text_encoder.config.num_hidden_layers):
        src, dst = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{src}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            )
            for ours, theirs in inner.items():
                out[f"{dst}{theirs}.{kind}"] = state.pop(f"{src}{ours}.{kind}")
    if state:
        raise ValueError(f"text encoder weights with no OpenCLIP name: {sorted(state)[:5]}")
    return out


def model_to_ldm(unet, vae, text_encoder, text_layout: str = "auto") -> dict[str, torch.Tensor]:
    """The whole model in the original layout.

    `text_layout` "clip" (SD 1.x), "open_clip" (SD 2.x) or "auto": OpenCLIP for 1024-wide GELU encoders.
    """
    if text_layout == "auto":
        config = text_encoder.config
        text_layout = "open_clip" if config.hidden_size == 1024 and config.hidden_act == "gelu" else "clip"
    text = open_clip_to_ldm(text_encoder) if text_layout == "open_clip" else clip_to_ldm(text_encoder)
    return {**unet_to_ldm(unet), **vae_to_ldm(vae), **text}


def save_single_file(
    path: Path,
    unet,
    vae,
    text_encoder,
    dtype: torch.dtype = torch.float16,
    metadata: dict[str, str] | None = None,
    text_layout: str = "auto",
) -> None:
    """Atomically write the model as one safetensors file (fp16 is what these files are usually shared in)."""
    write_ldm_file(path, model_to_ldm(unet, vae, text_encoder, text_layout), dtype, metadata)


def write_ldm_file(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                   metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items() if v.is_floating_point()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(Path(path)) as tmp:
        save_file(state, str(tmp), metadata=meta)


def _rename_prefix(key: str, renames: list[tuple[str, str]]) -> str:
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _rename_inner(key: str, names: dict[str, str]) -> str:
    head, _, leaf = key.rpartition(".")
    parts = head.split(".")
    for old, new in names.items():
        old_parts = old.split(".")
        n = len(old_parts)
        for i in range(len(parts) - n + 1):
            if parts[i:i + n] == old_parts:
                parts[i:i + n] = new.split(".")
                return ".".join(parts) + "." + leaf
    return key
