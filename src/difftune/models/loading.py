"""Resolve `model.path` to a loaded adapter: built-in tiny model, diffusers folder, or single file.

Everything loads from local files; nothing is fetched from a hub.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from difftune.config.schema import ModelConfig
from difftune.errors import ModelLoadError  # noqa: F401  (re-exported for callers)
from difftune.models.sd import StableDiffusionModel
from difftune.models.tiny import BUILTIN_MODELS, build_tiny_components

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
SD_PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"}




def load_model(config: ModelConfig) -> StableDiffusionModel:
    """Load the model named by `config.path` on the CPU; the trainer moves it to its device."""
    source = config.path
    if source in BUILTIN_MODELS:
        parts = build_tiny_components(source)
        family = "tiny-sd"
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            parts, family = _load_diffusers_folder(path)
        elif path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            from difftune.models.single_file import load_single_file

            parts, family = load_single_file(path, config)
        else:
            raise ModelLoadError(
                f"model.path = {source!r}: not found or not loadable. Expected a built-in name "
                f"({', '.join(BUILTIN_MODELS)}), a diffusers folder containing model_index.json, or a single "
                f"checkpoint file ({', '.join(SINGLE_FILE_SUFFIXES)})"
            )
    if config.vae_path:
        parts["vae"] = _load_vae(Path(config.vae_path))
    if config.prediction_type != "auto":
        parts["noise_scheduler"] = DDPMScheduler.from_config(
            parts["noise_scheduler"].config, prediction_type=config.prediction_type
        )
    return StableDiffusionModel(family=family, clip_skip=config.clip_skip, source=source, **parts)


def _load_diffusers_folder(path: Path) -> tuple[dict, str]:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"model.path = '{path}': folder has no model_index.json (is it a diffusers model folder?)")
    index = json.loads(index_file.read_text())
    pipeline_class = index.get("_class_name", "")
    if pipeline_class not in SD_PIPELINES:
        raise ModelLoadError(
            f"{index_file}: pipeline {pipeline_class!r} is not supported yet; supported: Stable Diffusion 1.x/2.x "
            f"({', '.join(sorted(SD_PIPELINES))}). SDXL, SD3 and Flux adapters come in a later release."
        )
    missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (path / p).is_dir()]
    if missing:
        raise ModelLoadError(f"model.path = '{path}': missing component folder(s): {', '.join(missing)}")
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **_weights_variant(path / "unet"))
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **_weights_variant(path / "vae"))
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **_weights_variant(path / "text_encoder"))
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.path = '{path}': could not load the diffusers components: {e}") from e
    parts = {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "noise_scheduler": scheduler,
    }
    return parts, detect_family(unet, scheduler)


def _weights_variant(folder: Path) -> dict:
    """Loading options for a component folder; hub downloads often hold only `*.fp16.safetensors`."""
    options = {"local_files_only": True}
    names = [p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    plain = [n for n in names if n.count(".") == 1 or ".index." in n and n.count(".") == 2]
    if not plain:
        variants = {n.split(".")[-2] for n in names if n.count(".") >= 2 and ".index." not in n}
        if len(variants) == 1:
            options["variant"] = variants.pop()
    return options


def detect_family(unet: UNet2DConditionModel, scheduler: DDPMScheduler) -> str:
    """sd1 (768-d CLIP), sd2 / sd2-v (1024-d OpenCLIP), otherwise 'sd-custom' (e.g. tiny models)."""
    dim = unet.config.cross_attention_dim
    if dim == 768:
        return "sd1"
    if dim == 1024:
        return "sd2-v" if scheduler.config.prediction_type == "v_prediction" else "sd2"
    return "sd-custom"


def _load_vae(path: Path) -> AutoencoderKL:
    if path.is_dir():
        sub = "vae" if (path / "vae").is_dir() else None
        return AutoencoderKL.from_pretrained(path, subfolder=sub, local_files_only=True)
    if path.is_file():
        return AutoencoderKL.from_single_file(str(path))
    raise ModelLoadError(f"model.vae_path = '{path}': not found (expected a diffusers VAE folder or a .safetensors file)")
