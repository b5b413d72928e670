"""SDXL (base 1.0 and the models made from it: Pony, Illustrious, NoobAI, ...), epsilon or v-prediction.

Entry points for the registry (models/registry.py): `load`, `weightless`, `detect_single_file`,
`reference_models`. Single files in the SGM layout A1111/Forge/ComfyUI share load offline with the
configs in `models/configs/sdxl/` and both CLIP BPE tokenizers built from open_clip's vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from difftune.errors import ModelLoadError, SingleFileError
from difftune.models.sdxl.adapter import TE1_PREFIX, TE2_PREFIX, StableDiffusionXLModel

FOLDER_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
REFINER = ("the SDXL refiner only denoises the last steps of a base model's image and has no CLIP ViT-L encoder; "
           "train the SDXL base model (or a model made from it) instead")
REFINER_POOLED_INPUT = 2560  # the refiner's added embedding: 1280 pooled + 5 x 256 (sizes and aesthetic score)
V_PRED_KEYS = ("v_pred", "edm_vpred.sigma_max")
"""Flags v-prediction SDXL files (NoobAI-XL v-pred and others) carry; diffusers ignores them."""


def load(config) -> StableDiffusionXLModel:
    from diffusers import DDPMScheduler

    from difftune.models.sdxl.tiny import BUILTIN_MODELS, build_tiny_components

    source = config.path
    if source in BUILTIN_MODELS:
        parts, variant = build_tiny_components(source), "tiny-sdxl"
    elif Path(source).expanduser().is_dir():
        parts, variant = load_folder(Path(source).expanduser())
    else:
        parts, variant = load_single_file(Path(source).expanduser(), config)
    if config.vae_path:
        from difftune.models.sd import load_vae

        parts["vae"] = load_vae(Path(config.vae_path).expanduser())
    prediction = config.prediction_type if config.prediction_type != "auto" else (
        "v_prediction" if variant == "sdxl-v" else None)
    if prediction:
        parts["noise_scheduler"] = DDPMScheduler.from_config(parts["noise_scheduler"].config, prediction_type=prediction)
    return StableDiffusionXLModel(family=variant, clip_skip=config.clip_skip, source=source, **parts)


def detect_single_file(keys: list[str], path: Path) -> str | None:
    """"sdxl" for an SDXL base-layout file; a refiner is refused here with what to do instead."""
    if any(k.startswith(TE2_PREFIX) for k in keys) and any(k.startswith(TE1_PREFIX) for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise SingleFileError(f"model.path = '{path}': this is an SDXL refiner checkpoint: {REFINER}")
    return None


def load_folder(path: Path) -> tuple[dict, str]:
    import json

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from difftune.models.sd import weights_variant

    unet_config = path / "unet" / "config.json"
    if unet_config.is_file() and json.loads(unet_config.read_text()).get("projection_class_embeddings_input_dim") \
            == REFINER_POOLED_INPUT or not (path / "text_encoder").is_dir() and (path / "text_encoder_2").is_dir():
        raise ModelLoadError(f"model.path = '{path}': this is the SDXL refiner: {REFINER}")
    missing = [p for p in FOLDER_COMPONENTS if not (path / p).is_dir()]
    if missing:
        raise ModelLoadError(f"model.path = '{path}': missing component folder(s): {', '.join(missing)}")
    try:
        parts = {
            "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights_variant(path / "unet")),
            "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", **weights_variant(path / "vae")),
            "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder",
                                                          **weights_variant(path / "text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder_2", **weights_variant(path / "text_encoder_2")),
            "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True),
            "tokenizer_2": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True),
            # Folders often name an inference sampler (Euler); training needs the DDPM noise schedule of the same betas.
            "noise_scheduler": DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True),
        }
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.path = '{path}': could not load the diffusers components: {e}") from e
    variant = "sdxl-v" if parts["noise_scheduler"].config.prediction_type == "v_prediction" else "sdxl"
    return parts, variant


def load_single_file(path: Path, config) -> tuple[dict, str]:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from difftune.models.sd.single_file import tokenizer_for
    from difftune.models.single_file_io import (
        READ_ERRORS,
        check_fully_loaded,
        config_dir_for,
        read_checkpoint,
    )

    checkpoint = read_checkpoint(path)
    detect_single_file(list(checkpoint), path)
    variant = config.family if config.family != "auto" else (
        "sdxl-v" if any(k in checkpoint for k in V_PRED_KEYS) else "sdxl")
    config_dir = config_dir_for(path, config, "sdxl", ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"))
    folder = str(config_dir)
    try:
        unet = UNet2DConditionModel.from_single_file(checkpoint, config=folder, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_single_file(checkpoint, config=folder, subfolder="vae", local_files_only=True)
        text_encoder = create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint, subfolder="text_encoder",
                                                            config=folder, local_files_only=True)
        text_encoder_2 = create_diffusers_clip_model_from_ldm(
            CLIPTextModelWithProjection, checkpoint, subfolder="text_encoder_2", config=folder, local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(config_dir, subfolder="scheduler", local_files_only=True)
    except READ_ERRORS as e:
        raise SingleFileError(f"model.path = '{path}': the weights do not fit the SDXL configs in '{config_dir}': {e}. "
                              "For another SGM-layout architecture, set model.config_dir") from e
    check_fully_loaded(path, {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2})
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
             "tokenizer": tokenizer_for(text_encoder, config_dir), "noise_scheduler": scheduler,
             "tokenizer_2": tokenizer_for(text_encoder_2, config_dir, "tokenizer_2")}
    return parts, variant


def weightless(config) -> StableDiffusionXLModel | None:
    """SDXL's architecture on the meta device (for doctor's sizes and LoRA layer tables)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from difftune.models.sdxl.tiny import BUILTIN_MODELS
    from difftune.models.single_file_io import shipped_config_dir

    if config.path in BUILTIN_MODELS:
        from difftune.models.sd.tiny import sd_noise_scheduler, tiny_vae
        from difftune.models.sdxl.tiny import tiny_sdxl_unet, tiny_text_encoders

        with init_empty_weights():
            text_encoder, text_encoder_2 = tiny_text_encoders()
            parts = {"unet": tiny_sdxl_unet(), "vae": tiny_vae(), "text_encoder": text_encoder,
                     "text_encoder_2": text_encoder_2}
        return StableDiffusionXLModel(family="tiny-sdxl", tokenizer=None, tokenizer_2=None, source=config.path,
                                      noise_scheduler=sd_noise_scheduler(BUILTIN_MODELS[config.path]), **parts)
    path = Path(config.path).expanduser()
    folder = path if path.is_dir() else (Path(config.config_dir).expanduser() if config.config_dir
                                         else shipped_config_dir("sdxl"))
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    with init_empty_weights():
        parts = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json")),
            "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig.from_json_file(folder / "text_encoder_2" / "config.json")),
        }
    return StableDiffusionXLModel(family="sdxl", tokenizer=None, tokenizer_2=None, noise_scheduler=scheduler,
                                  source=config.path, **parts)


def reference_models() -> list[StableDiffusionXLModel]:
    """Weightless SDXL and tiny-sdxl: the layer names `difftune convert` uses when no model is given."""
    from difftune.config.schema import ModelConfig
    from difftune.models.single_file_io import shipped_config_dir

    return [weightless(ModelConfig(path=str(shipped_config_dir("sdxl")))), weightless(ModelConfig(path="tiny-sdxl"))]
