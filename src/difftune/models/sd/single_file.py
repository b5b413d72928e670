"""Load a single-file Stable Diffusion 1.x/2.x checkpoint (.safetensors / .ckpt, the A1111/ComfyUI layout).

diffusers converts the original (LDM) key layout; what it needs from a hub — the component configs
and the tokenizer — ships inside difftune instead: `models/configs/<variant>/` holds the diffusers
configs of SD 1.x, SD 2.x (512 px, epsilon) and SD 2.x-v (768 px, v-prediction), and the CLIP BPE
tokenizer is built from the vocabulary in the `open_clip_torch` wheel. Nothing is fetched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from transformers import CLIPTextModel

from difftune.errors import SingleFileError
from difftune.models.clip_tokenizers import (
    BYTE_LEVEL_VOCAB_SIZE,
    byte_level_clip_tokenizer,
    openai_clip_tokenizer,
)
from difftune.models.single_file_io import READ_ERRORS, check_fully_loaded, config_dir_for, read_checkpoint

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CROSS_ATTENTION_KEY = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
SD_TEXT_PREFIX = "cond_stage_model."
SD2_BASE_GLOBAL_STEP = 875000  # SD 2.x-base (epsilon) checkpoints carry this step; the 768-v ones do not
COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")


def is_sd_layout(keys: list[str]) -> bool:
    """An SD 1.x/2.x single file: an LDM UNet with a `cond_stage_model` text encoder (SDXL has `conditioner`)."""
    return CROSS_ATTENTION_KEY in keys and any(k.startswith(SD_TEXT_PREFIX) for k in keys)


def variant_from_weights(checkpoint: dict[str, torch.Tensor], path: Path) -> str:
    """sd1 / sd2 / sd2-v from the cross-attention width (and SD 2.x-base's training step)."""
    context_dim = checkpoint[CROSS_ATTENTION_KEY].shape[-1]
    if context_dim == 768:
        return "sd1"
    if context_dim == 1024:
        step = checkpoint.get("global_step")
        return "sd2" if step is not None and int(step) == SD2_BASE_GLOBAL_STEP else "sd2-v"
    raise SingleFileError(
        f"model.path = '{path}': cross-attention width {context_dim} matches neither SD 1.x (768) nor SD 2.x (1024); "
        "set model.config_dir to a diffusers config folder for this architecture"
    )


def load_single_file(path: Path, config) -> tuple[dict, str]:
    """Components of the checkpoint at `path` and its variant name.

    `model.family` overrides detection (e.g. "sd2" for a 512-px SD 2.x-base file without its
    training step); `model.config_dir` replaces the shipped configs (any SD-layout architecture).
    """
    checkpoint = read_checkpoint(path)
    if CROSS_ATTENTION_KEY not in checkpoint:
        raise SingleFileError(f"model.path = '{path}': no Stable Diffusion UNet found (missing key "
                              f"'{CROSS_ATTENTION_KEY}')")
    if config.config_dir:
        variant = config.family if config.family != "auto" else "sd-custom"
    else:
        variant = config.family if config.family != "auto" else variant_from_weights(checkpoint, path)
    config_dir = config_dir_for(path, config, variant, COMPONENTS)
    try:
        unet = UNet2DConditionModel.from_single_file(checkpoint, config=str(config_dir), subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_single_file(checkpoint, config=str(config_dir), subfolder="vae", local_files_only=True)
        text_encoder = create_diffusers_clip_model_from_ldm(
            CLIPTextModel, checkpoint, subfolder="text_encoder", config=str(config_dir), local_files_only=True
        )
        scheduler = DDPMScheduler.from_pretrained(config_dir, subfolder="scheduler", local_files_only=True)
    except READ_ERRORS as e:
        raise SingleFileError(
            f"model.path = '{path}': the weights do not fit the {variant} configs in '{config_dir}': {e}. "
            "If this is another SD-layout architecture, set model.config_dir (and model.family)"
        ) from e
    check_fully_loaded(path, {"unet": unet, "vae": vae, "text_encoder": text_encoder})
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder,
             "tokenizer": tokenizer_for(text_encoder, config_dir), "noise_scheduler": scheduler}
    return parts, variant


def tokenizer_for(text_encoder: CLIPTextModel, config_dir: Path, subfolder: str = "tokenizer"):
    """A tokenizer folder next to the configs wins; else the CLIP BPE (SD1: padded with EOS, OpenCLIP: "!")."""
    from transformers import CLIPTokenizer

    if (config_dir / subfolder).is_dir():
        return CLIPTokenizer.from_pretrained(config_dir, subfolder=subfolder, local_files_only=True)
    vocab = text_encoder.config.vocab_size
    if vocab == 49408:
        open_clip = text_encoder.config.hidden_size >= 1024  # SD 2.x's ViT-H and SDXL's bigG pad with "!"
        return openai_clip_tokenizer(pad_token="!" if open_clip else "<|endoftext|>")
    if vocab == BYTE_LEVEL_VOCAB_SIZE:
        return byte_level_clip_tokenizer()
    raise SingleFileError(
        f"text encoder vocabulary of {vocab} tokens has no built-in tokenizer; add a {subfolder}/ folder "
        f"(vocab.json + merges.txt) to model.config_dir '{config_dir}'"
    )
