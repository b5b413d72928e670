"""Flux.1 (dev, with its distilled-guidance embedding, and schnell) as a model family.

Entry points for the registry (models/registry.py): `load`, `weightless`, `detect_single_file`,
`reference_models`. Three sources load: the built-in tiny models, a diffusers folder (FluxPipeline),
and the single transformer file BFL and ComfyUI users have (`flux1-dev.safetensors`, BFL key layout,
optionally under `model.diffusion_model.`), with the other parts given as their own files or folders:
`model.text_encoder_path` (CLIP-L), `model.text_encoder_2_path` (T5-XXL), `model.vae_path` (the
16-channel autoencoder, e.g. BFL's `ae.safetensors`) and, for a T5 single file, `model.tokenizer_path`.
The diffusers configs of both variants ship in `models/configs/flux-dev|flux-schnell/`; the CLIP
tokenizer is built offline from open_clip's vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from difftune.errors import ModelLoadError, SingleFileError
from difftune.models.flux.adapter import T5_TOKENS, FluxModel
from difftune.models.single_file_io import READ_ERRORS

FOLDER_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
FLUX_KEYS = ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "vector_in.in_layer.weight")
"""What every Flux.1 transformer file has (Chroma lacks vector_in; HunyuanVideo spells img_attn_qkv)."""
LOOKALIKES = {"distilled_guidance_layer.": "a Chroma checkpoint (made from Flux.1-schnell, without CLIP)",
              "double_stream_modulation_img.": "a FLUX.2 checkpoint"}
"""BFL-layout transformers that are not Flux.1 (their mark → what they are)."""
GUIDANCE_KEY = "guidance_in.in_layer.weight"
"""Only Flux.1-dev (and models made from it) has the distilled-guidance embedder."""
CLIP_PREFIXES = ("text_encoders.clip_l.transformer.", "cond_stage_model.transformer.", "clip_l.transformer.",
                 "conditioner.embedders.0.transformer.", "transformer.")
T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "t5xxl.transformer.", "transformer.")
"""Prefixes CLIP-L / T5 single files carry (ComfyUI's clip_l.safetensors and t5xxl_fp16.safetensors have none)."""
FP8_NAMES = ("float8_e4m3fn", "float8_e5m2")
"""fp8 files (ComfyUI's flux1-dev-fp8, t5xxl_fp8) are stored for inference: they load as bf16, which the
trainer computes in (model.base_precision = fp8 stores them so again)."""


def _widen_fp8(tensor):
    import torch

    return tensor.to(torch.bfloat16) if str(tensor.dtype).removeprefix("torch.") in FP8_NAMES else tensor


def load(config) -> FluxModel:
    """Load `config.path` (a ModelConfig) on the CPU: built-in tiny model, diffusers folder or transformer file."""
    from difftune.models.flux.tiny import (
        BUILTIN_MODELS,
        TINY_RESOLUTION,
        TINY_T5_TOKENS,
        build_tiny_components,
    )

    source, sample_size = config.path, None
    if source in BUILTIN_MODELS:
        parts, variant, tokens, sample_size = build_tiny_components(source), source, TINY_T5_TOKENS, TINY_RESOLUTION
        config_dir = None
    elif Path(source).expanduser().is_dir():
        config_dir = Path(source).expanduser()
        parts, variant = load_folder(config_dir)
        tokens = T5_TOKENS[variant]
    else:
        parts, variant, config_dir = load_single_file(Path(source).expanduser(), config)
        tokens = T5_TOKENS[variant]
    parts.update(separate_parts(config, config_dir, variant))
    # a tokenizer made for fewer T5 tokens than the pipeline default (the tiny ones, saved and loaded back) sets them
    tokens = min(tokens, getattr(parts["tokenizer_2"], "model_max_length", tokens) or tokens)
    return FluxModel(family=variant, clip_skip=config.clip_skip, source=source, max_sequence_length=tokens,
                     sample_size=sample_size, **parts)


def detect_single_file(keys: list[str], path: Path) -> str | None:
    """"flux-dev" / "flux-schnell" for a BFL-layout Flux.1 transformer file (schnell has no guidance_in)."""
    from difftune.models.flux.bfl_layout import SINGLE_FILE_PREFIX

    names = {k.removeprefix(SINGLE_FILE_PREFIX) for k in keys}
    if all(k in names for k in FLUX_KEYS):
        return "flux-dev" if GUIDANCE_KEY in names else "flux-schnell"
    if any(k.startswith("double_blocks.") and ".img_attn." in k for k in names):
        other = next((what for mark, what in LOOKALIKES.items() if any(k.startswith(mark) for k in names)), None)
        if other:
            raise SingleFileError(f"model.path = '{path}': this is {other}, which difftune does not train yet")
        lacking = [k for k in FLUX_KEYS if k not in names]
        raise SingleFileError(f"model.path = '{path}': a Flux.1 transformer in BFL's layout would have "
                              f"{', '.join(lacking)}; this file is incomplete or of another architecture")
    return None


def _variant(transformer_config) -> str:
    return "flux-dev" if transformer_config.get("guidance_embeds") else "flux-schnell"


def load_folder(path: Path) -> tuple[dict, str]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel

    from difftune.models.sd import weights_variant

    missing = [p for p in FOLDER_COMPONENTS if not (path / p).is_dir()]
    if missing:
        raise ModelLoadError(f"model.path = '{path}': missing component folder(s): {', '.join(missing)}")
    try:
        parts = {
            "transformer": FluxTransformer2DModel.from_pretrained(path, subfolder="transformer",
                                                                  **weights_variant(path / "transformer")),
            "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", **weights_variant(path / "vae")),
            "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder",
                                                          **weights_variant(path / "text_encoder")),
            "text_encoder_2": T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2",
                                                             **weights_variant(path / "text_encoder_2")),
            "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True),
            "tokenizer_2": t5_tokenizer(path / "tokenizer_2", f"model.path = '{path}'"),
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler",
                                                                         local_files_only=True),
        }
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.path = '{path}': could not load the diffusers components: {e}") from e
    return parts, _variant(parts["transformer"].config)


def load_single_file(path: Path, config) -> tuple[dict, str, Path | None]:
    """The transformer of a BFL-layout file, its variant and the config folder the other parts read."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from difftune.models.single_file_io import read_checkpoint

    missing = [(key, what) for key, what in (("text_encoder_path", "CLIP-L (a folder, or e.g. ComfyUI's clip_l.safetensors)"),
                                     ("text_encoder_2_path", "T5-XXL (a folder, or e.g. t5xxl_fp16.safetensors)"),
                                     ("vae_path", "the Flux VAE (a folder, or BFL's ae.safetensors)"))
               if not getattr(config, key)]
    if missing:
        needs = "; ".join(f"model.{key} = {what}" for key, what in missing)
        raise ModelLoadError(f"model.path = '{path}' is a Flux transformer only: set {needs} to the other parts "
                             "(each a diffusers folder or a single .safetensors file)")
    checkpoint = read_checkpoint(path)
    detected = detect_single_file(list(checkpoint), path)
    if detected is None:
        raise SingleFileError(f"model.path = '{path}': not a Flux.1 transformer in BFL's layout (it lacks "
                              f"{', '.join(FLUX_KEYS)})")
    variant = config.family if config.family in T5_TOKENS else detected
    config_dir = Path(config.config_dir).expanduser() if config.config_dir else None
    transformer = transformer_from_bfl(checkpoint, component_dir(config_dir, variant, "transformer"), path)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(component_dir(config_dir, variant, "scheduler"),
                                                                subfolder="scheduler", local_files_only=True)
    return {"transformer": transformer, "scheduler": scheduler}, variant, config_dir


def component_dir(config_dir: Path | None, variant: str, component: str) -> Path:
    """The folder whose `<component>/` config a single file is read with: model.config_dir when it has one,
    else the shipped configs of the variant."""
    from difftune.models.single_file_io import shipped_config_dir

    if config_dir is not None and (config_dir / component).is_dir():
        return config_dir
    return shipped_config_dir(variant if variant in T5_TOKENS else "flux-dev")  # a tiny model's parts replaced


def transformer_from_bfl(checkpoint: dict, config_root: Path, path: Path):
    """FluxTransformer2DModel from BFL-layout tensors, built from `config_root/transformer` (strict: every
    weight must be in the file and every tensor must have its place)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from difftune.models.flux.bfl_layout import bfl_to_diffusers
    from difftune.models.single_file_io import check_fully_loaded

    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    try:
        state = bfl_to_diffusers(tensors)
    except ValueError as e:
        raise SingleFileError(f"model.path = '{path}': {e}") from None
    state = {k: _widen_fp8(v) for k, v in state.items()}
    with init_empty_weights():
        transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(config_root / "transformer"))
    try:
        missing, unexpected = transformer.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise SingleFileError(f"model.path = '{path}': the weights do not fit the transformer config in "
                              f"'{config_root}': {e}. For another Flux architecture, set model.config_dir") from None
    if unexpected:
        raise SingleFileError(f"model.path = '{path}': {len(unexpected)} tensor(s) have no place in the transformer "
                              f"config in '{config_root}', e.g. {unexpected[0]} (a dev file read as schnell? set "
                              "model.family or model.config_dir)")
    check_fully_loaded(path, {"transformer": transformer})
    return transformer


# ------------------------------------------------------------------------------ separate parts
def separate_parts(config, config_dir: Path | None, variant: str) -> dict:
    """The parts given by their own keys (text_encoder_path, text_encoder_2_path, vae_path): required beside a
    transformer file, replacements otherwise."""
    parts = {}
    if config.text_encoder_path:
        parts["text_encoder"], parts["tokenizer"] = load_clip(Path(config.text_encoder_path).expanduser(),
                                                              component_dir(config_dir, variant, "text_encoder"))
    if config.text_encoder_2_path:
        tokenizer_path = Path(config.tokenizer_path).expanduser() if config.tokenizer_path else None
        parts["text_encoder_2"], parts["tokenizer_2"] = load_t5(
            Path(config.text_encoder_2_path).expanduser(), component_dir(config_dir, variant, "text_encoder_2"),
            tokenizer_path)
    if config.vae_path:
        parts["vae"] = load_vae(Path(config.vae_path).expanduser(), component_dir(config_dir, variant, "vae"))
    return parts


def load_clip(path: Path, config_root: Path):
    """CLIP-L and its tokenizer from a folder (a diffusers Flux folder or its text_encoder/) or a single file."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from difftune.models.sd.single_file import tokenizer_for

    key = f"model.text_encoder_path = '{path}'"
    try:
        if path.is_dir():
            sub = "text_encoder" if (path / "text_encoder").is_dir() else ""
            model = CLIPTextModel.from_pretrained(path, subfolder=sub, local_files_only=True)
            folder = path if sub else path.parent
            if (folder / "tokenizer").is_dir():
                return model, CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
            return model, tokenizer_for(model, config_root)
        if path.is_file():
            model = _from_single_file(CLIPTextModel, CLIPTextConfig, path, config_root / "text_encoder", CLIP_PREFIXES,
                                      key, strip_text_model=True)
            return model, tokenizer_for(model, config_root)
    except READ_ERRORS as e:
        raise ModelLoadError(f"{key}: could not load CLIP-L: {e}") from e
    raise ModelLoadError(f"{key}: not found (expected a folder or a .safetensors file)")


def load_t5(path: Path, config_root: Path, tokenizer_path: Path | None):
    """T5 and its tokenizer from a folder (a diffusers Flux folder or its text_encoder_2/) or a single file;
    a single file needs model.tokenizer_path (the SentencePiece tokenizer cannot be built offline)."""
    from transformers import T5Config, T5EncoderModel

    key = f"model.text_encoder_2_path = '{path}'"
    try:
        if path.is_dir():
            sub = "text_encoder_2" if (path / "text_encoder_2").is_dir() else ""
            model = T5EncoderModel.from_pretrained(path, subfolder=sub, local_files_only=True)
            if tokenizer_path is None:
                beside = (path if sub else path.parent) / "tokenizer_2"
                tokenizer_path = beside if beside.is_dir() else path
            return model, t5_tokenizer(tokenizer_path, key)
        if path.is_file():
            model = _from_single_file(T5EncoderModel, T5Config, path, config_root / "text_encoder_2", T5_PREFIXES, key)
            return model, t5_tokenizer(tokenizer_path, key)
    except ModelLoadError:
        raise
    except READ_ERRORS as e:
        raise ModelLoadError(f"{key}: could not load T5: {e}") from e
    raise ModelLoadError(f"{key}: not found (expected a folder or a .safetensors file)")


def t5_tokenizer(folder: Path | None, what: str):
    from difftune.models.t5_text import load_t5_tokenizer

    return load_t5_tokenizer(folder, what)


def load_vae(path: Path, config_root: Path):
    """The 16-channel VAE from a diffusers folder (or a Flux folder holding vae/), or a single file in BFL's
    layout (ae.safetensors), read by diffusers with the config in `config_root/vae`."""
    from diffusers import AutoencoderKL

    key = f"model.vae_path = '{path}'"
    try:
        if path.is_dir():
            return AutoencoderKL.from_pretrained(path, subfolder="vae" if (path / "vae").is_dir() else None,
                                                 local_files_only=True)
        if path.is_file():
            from difftune.models.single_file_io import check_fully_loaded

            vae = AutoencoderKL.from_single_file(str(path), config=str(config_root), subfolder="vae",
                                                 local_files_only=True)
            check_fully_loaded(path, {"vae": vae})
            return vae
    except (SingleFileError, *READ_ERRORS) as e:
        raise ModelLoadError(f"{key}: could not load the VAE: {e}") from e
    raise ModelLoadError(f"{key}: not found (expected a diffusers VAE folder or a .safetensors file)")


def _from_single_file(model_class, config_class, path: Path, config_folder: Path, prefixes: tuple[str, ...],
                      key: str, strip_text_model: bool = False):
    """A transformers encoder from one .safetensors of its weights (prefixes removed), built on the meta
    device from the shipped config and filled strictly: a weight the file lacks is an error."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    from difftune.models.single_file_io import check_fully_loaded

    with init_empty_weights():
        model = model_class(config_class.from_json_file(config_folder / "config.json"))
    state = {}
    for name, value in load_file(str(path)).items():
        name = next((name[len(p):] for p in prefixes if name.startswith(p)), name)
        if strip_text_model and not hasattr(model, "text_model"):
            name = name.removeprefix("text_model.")  # transformers 5's CLIPTextModel has no text_model wrapper
        state[name] = value
    expected = model.state_dict()
    # T5's input embedding is stored once, as shared or as encoder.embed_tokens
    if "shared.weight" in expected and "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    if "encoder.embed_tokens.weight" in expected and "encoder.embed_tokens.weight" not in state and "shared.weight" in state:
        state["encoder.embed_tokens.weight"] = state["shared.weight"]
    state = {k: _widen_fp8(v) for k, v in state.items() if k in expected}
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise ModelLoadError(f"{key}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the config in "
                             f"'{config_folder}' {tuple(expected[wrong[0]].shape)} (another model's file?)")
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    try:
        check_fully_loaded(path, {key.split(" ")[0]: model})
    except SingleFileError as e:
        raise ModelLoadError(str(e)) from None
    return model


# --------------------------------------------------------------------------------- weightless
def weightless(config) -> FluxModel:
    """Flux's architecture on the meta device (doctor's sizes and LoRA layer tables)."""
    import json

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from difftune.models.flux.tiny import BUILTIN_MODELS, TINY_T5_TOKENS, flux_scheduler, tiny_modules

    if config.path in BUILTIN_MODELS:
        with init_empty_weights():
            parts = tiny_modules(config.path)
        return FluxModel(family=config.path, tokenizer=None, tokenizer_2=None, source=config.path,
                         scheduler=flux_scheduler(BUILTIN_MODELS[config.path]), max_sequence_length=TINY_T5_TOKENS,
                         clip_skip=config.clip_skip, **parts)
    path = Path(config.path).expanduser()
    if path.is_dir():
        folder = path
        variant = _variant(json.loads((folder / "transformer" / "config.json").read_text()))
        roots = dict.fromkeys(("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"), folder)
    else:
        variant = config.family if config.family in T5_TOKENS else _peek_variant(path)
        config_dir = Path(config.config_dir).expanduser() if config.config_dir else None
        roots = {c: component_dir(config_dir, variant, c)
                 for c in ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler")}
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(roots["scheduler"], subfolder="scheduler",
                                                                local_files_only=True)
    with init_empty_weights():
        parts = {
            "transformer": FluxTransformer2DModel.from_config(
                FluxTransformer2DModel.load_config(roots["transformer"] / "transformer")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(roots["vae"] / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_json_file(roots["text_encoder"] / "text_encoder" / "config.json")),
            "text_encoder_2": T5EncoderModel(T5Config.from_json_file(roots["text_encoder_2"] / "text_encoder_2" / "config.json")),
        }
    # No tokenizers: a weightless model is only measured and named, never run.
    return FluxModel(family=variant, tokenizer=None, tokenizer_2=None, scheduler=scheduler, source=config.path,
                     max_sequence_length=T5_TOKENS[variant], clip_skip=config.clip_skip, **parts)


def _peek_variant(path: Path) -> str:
    """flux-dev / flux-schnell from a single file's tensor names (read from the header of a .safetensors)."""
    from difftune.models.registry import single_file_keys

    return detect_single_file(single_file_keys(path), path) or "flux-dev"


def reference_models() -> list[FluxModel]:
    """Weightless Flux.1-dev and tiny-flux: the layer names `difftune convert` uses when no model is given."""
    from difftune.config.schema import ModelConfig
    from difftune.models.single_file_io import shipped_config_dir

    return [weightless(ModelConfig(path=str(shipped_config_dir("flux-dev")))), weightless(ModelConfig(path="tiny-flux"))]
