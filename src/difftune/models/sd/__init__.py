"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a cross-attention UNet, DDPM epsilon or v.

The family's entry points for the registry (models/registry.py): `load`, `weightless`,
`detect_single_file`.
"""

from __future__ import annotations

from pathlib import Path

from difftune.errors import ModelLoadError
from difftune.models.sd.adapter import StableDiffusionModel

FOLDER_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def load(config) -> StableDiffusionModel:
    """Load `config.path` (a ModelConfig) on the CPU: built-in tiny model, diffusers folder or single file."""
    from diffusers import DDPMScheduler

    from difftune.models.sd.tiny import BUILTIN_MODELS, build_tiny_components

    source = config.path
    if source in BUILTIN_MODELS:
        parts, variant = build_tiny_components(source), "tiny-sd"
    elif Path(source).expanduser().is_dir():
        parts, variant = load_folder(Path(source).expanduser())
    else:
        from difftune.models.sd.single_file import load_single_file

        parts, variant = load_single_file(Path(source).expanduser(), config)
    if config.vae_path:
        parts["vae"] = load_vae(Path(config.vae_path).expanduser())
    if config.prediction_type != "auto":
        parts["noise_scheduler"] = DDPMScheduler.from_config(parts["noise_scheduler"].config,
                                                             prediction_type=config.prediction_type)
    return StableDiffusionModel(family=variant, clip_skip=config.clip_skip, source=source, **parts)


def detect_single_file(keys: list[str], path: Path) -> str | None:
    from difftune.models.sd.single_file import is_sd_layout

    return "sd" if is_sd_layout(keys) else None


def load_folder(path: Path) -> tuple[dict, str]:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    missing = [p for p in FOLDER_COMPONENTS if not (path / p).is_dir()]
    if missing:
        raise ModelLoadError(f"model.path = '{path}': missing component folder(s): {', '.join(missing)}")
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights_variant(path / "unet"))
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **weights_variant(path / "vae"))
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights_variant(path / "text_encoder"))
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.path = '{path}': could not load the diffusers components: {e}") from e
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "noise_scheduler": scheduler}
    return parts, variant_of(unet.config.cross_attention_dim, scheduler.config.prediction_type)


def variant_of(cross_attention_dim: int, prediction_type: str) -> str:
    """sd1 (768-d CLIP), sd2 / sd2-v (1024-d OpenCLIP), otherwise 'sd-custom' (e.g. tiny models)."""
    if cross_attention_dim == 768:
        return "sd1"
    if cross_attention_dim == 1024:
        return "sd2-v" if prediction_type == "v_prediction" else "sd2"
    return "sd-custom"


def weights_variant(folder: Path) -> dict:
    """Loading options for a component folder; hub downloads often hold only `*.fp16.safetensors`."""
    options = {"local_files_only": True}
    names = [p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    plain = [n for n in names if n.count(".") == 1 or ".index." in n and n.count(".") == 2]
    if not plain:
        variants = {n.split(".")[-2] for n in names if n.count(".") >= 2 and ".index." not in n}
        if len(variants) == 1:
            options["variant"] = variants.pop()
    return options


def load_vae(path: Path):
    from diffusers import AutoencoderKL

    if path.is_dir():
        sub = "vae" if (path / "vae").is_dir() else None
        return AutoencoderKL.from_pretrained(path, subfolder=sub, local_files_only=True)
    if path.is_file():
        return AutoencoderKL.from_single_file(str(path))
    raise ModelLoadError(f"model.vae_path = '{path}': not found (expected a diffusers VAE folder or a .safetensors file)")


def weightless(config) -> StableDiffusionModel | None:
    """The model built from its configs with no weights (meta tensors): for doctor's sizes and LoRA
    inspection. None when that needs the weights (a .ckpt with model.family = auto)."""
    from accelerate import init_empty_weights
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from difftune.models.clip_tokenizers import byte_level_clip_tokenizer
    from difftune.models.sd.tiny import (
        BUILTIN_MODELS,
        sd_noise_scheduler,
        tiny_text_encoder,
        tiny_unet,
        tiny_vae,
    )
    from difftune.models.single_file_io import shipped_config_dir

    if config.path in BUILTIN_MODELS:
        with init_empty_weights():
            parts = {"unet": tiny_unet(), "vae": tiny_vae(), "text_encoder": tiny_text_encoder()}
        return StableDiffusionModel(family="tiny-sd", tokenizer=byte_level_clip_tokenizer(),
                                    noise_scheduler=sd_noise_scheduler(BUILTIN_MODELS[config.path]), source=config.path,
                                    clip_skip=config.clip_skip, **parts)
    path = Path(config.path).expanduser()
    if path.is_dir():
        folder, variant = path, None
    else:
        variant = config.family if config.family != "auto" else _peek_variant(path)
        if variant is None:
            return None
        folder = Path(config.config_dir).expanduser() if config.config_dir else shipped_config_dir(variant)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    if config.prediction_type != "auto":
        scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type=config.prediction_type)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        text = CLIPTextModel(CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json"))
        vae = _meta_vae(folder)
    variant = variant or variant_of(unet.config.cross_attention_dim, scheduler.config.prediction_type)
    # No tokenizer: a weightless model is only measured and named (sizes, LoRA layer tables), never run.
    return StableDiffusionModel(family=variant, unet=unet, vae=vae, text_encoder=text, tokenizer=None,
                                noise_scheduler=scheduler, source=config.path, clip_skip=config.clip_skip)


def _meta_vae(folder: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))


def _peek_variant(path: Path) -> str | None:
    """sd1/sd2 from one tensor's shape in a .safetensors header (no weights read)."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    from difftune.models.sd.single_file import CROSS_ATTENTION_KEY

    with safe_open(str(path), framework="pt", device="cpu") as f:
        if CROSS_ATTENTION_KEY not in f.keys():
            return None
        width = f.get_slice(CROSS_ATTENTION_KEY).get_shape()[-1]
    return {768: "sd1", 1024: "sd2"}.get(width)


def reference_models() -> list[StableDiffusionModel]:
    """Weightless SD 1.x, 2.x and tiny models: the layer names `difftune convert` uses when no model is given."""
    from difftune.config.schema import ModelConfig
    from difftune.models.single_file_io import shipped_config_dir

    models = [weightless(ModelConfig(path=str(shipped_config_dir(v)))) for v in ("sd1", "sd2")]
    return [*models, weightless(ModelConfig(path="tiny-sd"))]
