"""SD3 and SD3.5 (medium, large): CLIP-L + CLIP-G + optional T5-XXL, an MMDiT, rectified flow.

Entry points for the registry (models/registry.py): `load`, `weightless`, `detect_single_file`,
`reference_models`. Sources: the built-in `tiny-sd3`, a diffusers folder (StableDiffusion3Pipeline), or
a single file in StabilityAI's layout (models/sd3/single_file.py) with the configs in
`models/configs/sd3/`, `sd3.5-medium/`, `sd3.5-large/`. `model.use_t5 = false` leaves T5 out entirely.
"""

from __future__ import annotations

from pathlib import Path

from difftune.errors import ConfigError, ModelLoadError
from difftune.models.sd3.adapter import StableDiffusion3Model

REQUIRED = ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler")
ENCODER_PATHS = {"text_encoder": "text_encoder_path", "text_encoder_2": "text_encoder_2_path",
                 "text_encoder_3": "text_encoder_3_path"}


def load(config) -> StableDiffusion3Model:
    """`config.path` (a ModelConfig) on the CPU: tiny-sd3, a diffusers folder or a single file."""
    from difftune.models.sd3.tiny import BUILTIN_MODELS, build_tiny_components

    if config.prediction_type != "auto":
        raise ConfigError(f"model.prediction_type = '{config.prediction_type}' is for the DDPM models (SD 1.x/2.x, "
                          "SDXL); SD3 predicts the flow velocity: remove it")
    source = config.path
    if source in BUILTIN_MODELS:
        parts, variant = build_tiny_components(config.use_t5), "tiny-sd3"
        parts.update(_given_encoders(config))
    elif Path(source).expanduser().is_dir():
        parts, variant = load_folder(Path(source).expanduser(), config)
    else:
        from difftune.models.sd3.single_file import load_single_file

        parts, variant = load_single_file(Path(source).expanduser(), config)
    if config.vae_path:
        from difftune.models.sd import load_vae

        parts["vae"] = load_vae(Path(config.vae_path).expanduser())
    return StableDiffusion3Model(family=variant, clip_skip=config.clip_skip, source=source, **parts)


def detect_single_file(keys: list[str], path: Path) -> str | None:
    from difftune.models.sd3.single_file import is_sd3_layout

    return "sd3" if is_sd3_layout(keys) else None


def load_folder(path: Path, config) -> tuple[dict, str]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from difftune.models.sd import weights_variant
    from difftune.models.sd3.encoders import load_encoder_folder

    given = {role for role, key in ENCODER_PATHS.items() if getattr(config, key)}
    missing = [p for p in REQUIRED if not (path / p).is_dir() and p not in given]
    if missing:
        raise ModelLoadError(f"model.path = '{path}': missing component folder(s): {', '.join(missing)}")
    try:
        parts = {
            "transformer": SD3Transformer2DModel.from_pretrained(path, subfolder="transformer",
                                                                 **weights_variant(path / "transformer")),
            "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", **weights_variant(path / "vae")),
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler",
                                                                         local_files_only=True),
        }
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.path = '{path}': could not load the diffusers components: {e}") from e
    roles = ["text_encoder", "text_encoder_2"] + (["text_encoder_3"] if (path / "text_encoder_3").is_dir() else [])
    for role in roles:
        if role not in given and (role != "text_encoder_3" or config.use_t5):
            parts.update(load_encoder_folder(path, role, config, "model.path"))  # with its tokenizer
    parts.update(_given_encoders(config))
    if config.use_t5 and "text_encoder_3" not in parts:
        parts["load_notes"] = [f"'{path}' has no text_encoder_3 (T5-XXL): training without T5 (its part of the text "
                               "embedding is zeros, as with model.use_t5 = false)"]
    return parts, variant_of(parts["transformer"].config)


def _given_encoders(config) -> dict:
    """Encoders set by model.text_encoder_path / _2_path / _3_path as folders (single files are read by
    the single-file loader, which converts them with the checkpoint)."""
    from difftune.models.sd3.encoders import load_encoder_folder

    found = {}
    for role, key in ENCODER_PATHS.items():
        given = getattr(config, key)
        if not given or (role == "text_encoder_3" and not config.use_t5):
            continue
        source = Path(given).expanduser()
        if source.is_dir():
            found.update(load_encoder_folder(source, role, config, f"model.{key}"))
        else:
            raise ModelLoadError(f"model.{key} = '{source}': with a diffusers folder or built-in model.path, give the "
                                 "encoder as a folder (a single-file encoder goes with a single-file model.path)")
    return found


def variant_of(transformer_config) -> str:
    """The SD3 variant a transformer config is, or 'sd3-custom' (tiny and other sizes)."""
    from difftune.models.sd3.single_file import KNOWN

    c = transformer_config
    key = (c.num_layers, bool(c.dual_attention_layers), c.qk_norm is not None)
    known = KNOWN.get(key)
    return known if known and c.num_attention_heads == c.num_layers else "sd3-custom"


def weightless(config) -> StableDiffusion3Model | None:
    """SD3's architecture on the meta device (doctor's sizes and memory plan, LoRA layer tables)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from difftune.models.sd3 import tiny
    from difftune.models.single_file_io import shipped_config_dir

    if config.path in tiny.BUILTIN_MODELS:
        with init_empty_weights(include_buffers=True):
            clip_l, clip_g = tiny.tiny_text_encoders()
            parts = {"transformer": tiny.tiny_transformer(), "vae": tiny.tiny_vae(), "text_encoder": clip_l,
                     "text_encoder_2": clip_g}
            if config.use_t5:
                from difftune.models.t5_text import tiny_t5_encoder

                parts["text_encoder_3"] = tiny_t5_encoder(width=tiny.T5_DIM, layers=2)
        return StableDiffusion3Model(family="tiny-sd3", tokenizer=None, tokenizer_2=None,
                                     scheduler=tiny.flow_scheduler(), source=config.path, **parts)
    path = Path(config.path).expanduser()
    if path.is_dir():
        folder, with_t5 = path, (path / "text_encoder_3").is_dir() or bool(config.text_encoder_3_path)
    elif path.suffix.lower() != ".safetensors":
        return None  # a pickled file's keys mean reading all of it
    else:
        from difftune.models.registry import single_file_keys
        from difftune.models.sd3.single_file import has_t5, variant_from_keys

        keys = single_file_keys(path)  # the header only
        variant = variant_from_keys(keys, path, config)
        folder = Path(config.config_dir).expanduser() if config.config_dir else shipped_config_dir(variant)
        with_t5 = has_t5(keys) or bool(config.text_encoder_3_path)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    with init_empty_weights(include_buffers=True):  # buffers too: SD3.5 medium's position table is 0.9 GB
        parts = {
            "transformer": SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(folder / "transformer")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            **{role: CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(folder / role / "config.json"))
               for role in ("text_encoder", "text_encoder_2")},
        }
        if config.use_t5 and with_t5:
            parts["text_encoder_3"] = T5EncoderModel(T5Config.from_json_file(folder / "text_encoder_3" / "config.json"))
    # No tokenizers: a weightless model is only measured and named, never run.
    return StableDiffusion3Model(family=variant_of(parts["transformer"].config), tokenizer=None, tokenizer_2=None,
                                 scheduler=scheduler, source=config.path, **parts)


def reference_models() -> list[StableDiffusion3Model]:
    """Weightless SD3.5 medium and large and tiny-sd3 (without T5, which no LoRA of difftune's trains):
    the layer names `difftune convert` uses when no model is given."""
    from difftune.config.schema import ModelConfig
    from difftune.models.single_file_io import shipped_config_dir

    sources = [str(shipped_config_dir(v)) for v in ("sd3.5-medium", "sd3.5-large")] + ["tiny-sd3"]
    return [weightless(ModelConfig(path=source, use_t5=False)) for source in sources]
