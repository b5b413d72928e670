"""The model families difftune knows: one folder each under `models/`, one line each here.

A family says what it can load (built-in names, diffusers pipeline classes, single-file layouts) and
builds the adapter the trainer talks to (`models/base.py`). `load_model` and `weightless_model`
dispatch on the source; nothing else in difftune names a family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

from difftune.errors import ModelLoadError, SingleFileError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class Family:
    """What one model family registers. Loading functions are imported lazily (`module:function`),
    so `difftune --help` and config checks do not import torch or diffusers."""

    name: str
    variants: tuple[str, ...]
    """Values of `model.family` that select this family for a single file (e.g. sd1, sd2, sd2-v)."""
    builtins: tuple[str, ...]
    """Built-in tiny model names (`model.path`)."""
    pipelines: frozenset[str]
    """diffusers `model_index.json` `_class_name`s this family loads from a folder."""
    module: str
    """Package with `load(config)`, `weightless(config)` and `detect_single_file(keys, path)`."""
    text_encoders: tuple[str, ...] = ("text_encoder",)
    """Roles of its text encoders, in order."""
    kohya_prefixes: dict[str, str] = field(default_factory=dict)
    """Role → the prefix of its layers in kohya-layout LoRA files."""
    diffusers_prefixes: dict[str, str] = field(default_factory=dict)
    """Role → the prefix of its layers in diffusers/PEFT-layout LoRA files."""
    objective: str = "ddpm"
    """"ddpm" (SD, SDXL) or "flow" (rectified flow: Flux, SD3): which loss settings apply."""
    frozen_text_encoders: tuple[str, ...] = ()
    """Text encoders difftune never trains (T5-XXL): `train_text_encoder = true` leaves them out."""
    lora_marks: tuple[str, ...] = ()
    """Key fragments that only this family's LoRA files have (to pick layer names for `difftune convert`)."""
    embedding_keys: dict[str, str] = field(default_factory=dict)
    """Role → the key of its vectors in textual-inversion embedding files (A1111/ComfyUI); empty: the family
    has no textual inversion."""

    def api(self, name: str) -> Callable[..., Any]:
        module = import_module(self.module)
        from difftune.library_noise import apply

        apply()  # the family module has imported diffusers and transformers by now
        return getattr(module, name)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


register(Family(
    name="sd", variants=("sd1", "sd2", "sd2-v"), builtins=("tiny-sd", "tiny-sd-v"), module="difftune.models.sd",
    pipelines=frozenset({"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"}),
    kohya_prefixes={"denoiser": "lora_unet", "text_encoder": "lora_te"},
    diffusers_prefixes={"denoiser": "unet", "text_encoder": "text_encoder"},
    embedding_keys={"text_encoder": "emb_params"},
))
register(Family(
    name="sdxl", variants=("sdxl", "sdxl-v"), builtins=("tiny-sdxl",), module="difftune.models.sdxl",
    pipelines=frozenset({"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                         "StableDiffusionXLInpaintPipeline"}),
    text_encoders=("text_encoder", "text_encoder_2"),
    kohya_prefixes={"denoiser": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    diffusers_prefixes={"denoiser": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"},
    embedding_keys={"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
    # two text encoders, SGM UNet names, or attention blocks deeper than one transformer block
    lora_marks=("lora_te1_", "lora_te2_", "text_encoder_2.", "lora_unet_input_blocks_", "lora_unet_output_blocks_",
                "lora_unet_middle_block_", "transformer_blocks_1_", "transformer_blocks.1."),
))

register(Family(
    name="sd3", variants=("sd3", "sd3.5-medium", "sd3.5-large"), builtins=("tiny-sd3",), module="difftune.models.sd3",
    pipelines=frozenset({"StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                         "StableDiffusion3InpaintPipeline"}),
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),  # CLIP-L, CLIP-G, T5-XXL
    frozen_text_encoders=("text_encoder_3",), objective="flow",
    kohya_prefixes={"denoiser": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2",
                    "text_encoder_3": "lora_te3"},
    diffusers_prefixes={"denoiser": "transformer", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2",
                        "text_encoder_3": "text_encoder_3"},
    lora_marks=("lora_unet_joint_blocks_", "transformer.transformer_blocks.", "lora_transformer_transformer_blocks_"),
))

register(Family(
    name="flux", variants=("flux-dev", "flux-schnell"), builtins=("tiny-flux", "tiny-flux-schnell"),
    module="difftune.models.flux",
    pipelines=frozenset({"FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"}),
    text_encoders=("text_encoder", "text_encoder_2"),  # CLIP-L (pooled), T5-XXL (sequence)
    frozen_text_encoders=("text_encoder_2",), objective="flow",
    kohya_prefixes={"denoiser": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te3"},
    diffusers_prefixes={"denoiser": "transformer", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"},
    lora_marks=("lora_unet_double_blocks_", "lora_unet_single_blocks_", "single_transformer_blocks.",
                "lora_transformer_single_transformer_blocks_"),
))
NOT_YET = {
    "PixArtSigmaPipeline": "PixArt",
    "StableCascadePriorPipeline": "Stable Cascade", "AuraFlowPipeline": "AuraFlow", "HunyuanDiTPipeline": "HunyuanDiT",
}
"""Pipelines people may point difftune at that it does not train yet (a clear refusal, not a traceback)."""


def lora_key_prefixes(layout: str) -> tuple[str, ...]:
    """Every family's LoRA key prefixes in `layout` ("kohya": `lora_unet_`, ...; "diffusers": `unet.`, ...)."""
    found = []
    for family in FAMILIES.values():
        prefixes = family.kohya_prefixes if layout == "kohya" else family.diffusers_prefixes
        found += [p + ("_" if layout == "kohya" else ".") for p in prefixes.values()]
    return tuple(dict.fromkeys(found))


def family_of_lora_keys(keys) -> str:
    """The family whose LoRA files carry these keys (a family without marks is the fallback).

    Families registered later are asked first: their marks are the more specific ones (a Flux or SD3
    LoRA's `transformer.transformer_blocks.1.` also holds SDXL's `transformer_blocks.1.`, and Flux's
    single blocks tell a Flux LoRA from an SD3 one, whose blocks both have)."""
    keys = list(keys)
    for family in reversed(FAMILIES.values()):
        if family.lora_marks and any(mark in key for key in keys for mark in family.lora_marks):
            return family.name
    return next(f.name for f in FAMILIES.values() if not f.lora_marks)


def builtin_names() -> list[str]:
    return [name for f in FAMILIES.values() for name in f.builtins]


def variant_names() -> list[str]:
    return [v for f in FAMILIES.values() for v in f.variants]


def family_of_variant(variant: str) -> Family:
    return next(f for f in FAMILIES.values() if variant in f.variants)


def family_for(config) -> Family:
    """The family that loads `config.path` (a ModelConfig); ModelLoadError when none does."""
    source = config.path
    for family in FAMILIES.values():
        if source in family.builtins:
            return family
    path = Path(source).expanduser()
    if path.is_dir():
        return _family_of_folder(path)  # its model_index.json says; model.family is for single files
    if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return family_of_variant(config.family) if config.family != "auto" else _family_of_file(path)
    raise ModelLoadError(
        f"model.path = {source!r}: not found or not loadable. Expected a built-in name "
        f"({', '.join(builtin_names())}), a diffusers folder containing model_index.json, or a single "
        f"checkpoint file ({', '.join(SINGLE_FILE_SUFFIXES)})"
    )


def _family_of_folder(path: Path) -> Family:
    import json

    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"model.path = '{path}': folder has no model_index.json (is it a diffusers model folder?)")
    try:
        pipeline = json.loads(index_file.read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{index_file}: unreadable ({e})") from None
    for family in FAMILIES.values():
        if pipeline in family.pipelines:
            return family
    supported = ", ".join(sorted(p for f in FAMILIES.values() for p in f.pipelines))
    what = f"{NOT_YET[pipeline]} is not supported yet" if pipeline in NOT_YET else f"pipeline {pipeline!r} is not supported"
    raise ModelLoadError(f"{index_file}: {what}; difftune loads: {supported}")


_FILE_FAMILIES: dict[tuple, Family] = {}
"""(path, size, mtime) → family: reading a pickled .ckpt's keys means unpickling all of it, and doctor,
the LR plan and the loader all ask."""


def _family_of_file(path: Path) -> Family:
    """Ask each family whether the file's keys are its layout (the first that says yes wins)."""
    stat = path.stat()
    identity = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if identity in _FILE_FAMILIES:
        return _FILE_FAMILIES[identity]
    keys = single_file_keys(path)
    for family in FAMILIES.values():
        if family.api("detect_single_file")(keys, path) is not None:
            _FILE_FAMILIES[identity] = family
            return family
    raise SingleFileError(f"model.path = '{path}': {describe_unknown_file(keys)}")


def single_file_keys(path: Path) -> list[str]:
    """Tensor names of a single file, read from the header only for .safetensors (no weights loaded)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise SingleFileError(f"model.path = '{path}': not a readable .safetensors file ({e}); was it fully "
                                  "downloaded?") from None
    from difftune.models.single_file_io import read_checkpoint

    return list(read_checkpoint(path))


OTHER_ARCHITECTURES = {
    "double_layers.": "an AuraFlow checkpoint",
}


def describe_unknown_file(keys: list[str]) -> str:
    """Why no family took a single file: a known other architecture, a LoRA, or something else."""
    for fragment, what in OTHER_ARCHITECTURES.items():
        if any(fragment in k for k in keys[:4000]):
            return f"this is {what}, which difftune does not train yet"
    if keys and all(k.startswith(("lora_", "unet.", "text_encoder", "transformer.")) for k in keys[:200]):
        return "this looks like a LoRA file; a LoRA goes in network.init_from (or `difftune sample --lora`)"
    return ("not a checkpoint of a family difftune knows (SD 1.x/2.x and SDXL files have UNet keys such as "
            "'model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight', Flux files "
            "'double_blocks.0.img_attn.qkv.weight', SD3 files 'joint_blocks.0.x_block.attn.qkv.weight'); a diffusers "
            "model is a folder with model_index.json")


def trained_roles(config) -> list[str]:
    """Roles a config trains (a Config): the denoiser and the text encoders train.train_text_encoder
    selects among those the model's family has (read from the registry, no model loaded)."""
    from difftune.optim.scaling import roles_to_train, with_embedding_role

    try:
        family = family_for(config.model)
    except ModelLoadError:  # doctor reports the model problem itself
        return with_embedding_role(config.network, roles_to_train(config.train, ("text_encoder",), known=False))
    return with_embedding_role(config.network,
                               roles_to_train(config.train, family.text_encoders, family.frozen_text_encoders))


def check_family_settings(config) -> list[str]:
    """What doctor and the trainer say about settings the configured family does not use, before any
    model loads: the other objective's loss settings are a ConfigError; settings of another family
    (`model.use_t5` is SD3's, `train.guidance_scale` Flux.1-dev's) are returned as warnings."""
    from difftune.models.objectives import check_objective_settings

    try:
        family = family_for(config.model)
    except ModelLoadError:
        return []  # the loader (or doctor) reports the model problem itself
    check_objective_settings(config.train, family.objective, family.name)
    warnings = []
    if not config.model.use_t5 and family.name != "sd3":
        warnings.append(f"model.use_t5 = false has no effect on {family.name}: it is an SD3/3.5 setting")
    if config.train.guidance_scale != 1.0 and family.name != "flux":
        warnings.append(f"train.guidance_scale = {config.train.guidance_scale} has no effect on {family.name}: it is "
                        "the distilled guidance Flux.1-dev trains with (sample.cfg_scale sets the samples' guidance)")
    return warnings
