"""Load an SD3/3.5 single file as StabilityAI ships it (models/sd3/sai_layout.py), offline.

diffusers converts the layout (`SD3Transformer2DModel.from_single_file`, `AutoencoderKL.from_single_file`,
its CLIP and T5 helpers); the configs come from `models/configs/<variant>/`, the variant from the weights:
the number of joint blocks, SD3.5-medium's dual attention (`x_block.attn2`) and the q/k norms of 3.5.
StabilityAI's SD3.5 files hold only the transformer and the VAE; the encoders (their `text_encoders/`
files, or a diffusers folder) come from `model.text_encoder_path`, `text_encoder_2_path`,
`text_encoder_3_path`. The CLIP tokenizers are built from open_clip's vocabulary; the T5 tokenizer
cannot be, so a T5 needs `model.tokenizer_path` unless a folder brings it.
"""

from __future__ import annotations

import re
from pathlib import Path

from difftune.errors import SingleFileError
from difftune.models.sd3.sai_layout import ENCODER_PREFIXES, T5_PREFIX, VAE_PREFIX
from difftune.models.single_file_io import READ_ERRORS, check_fully_loaded, config_dir_for, read_checkpoint

JOINT_BLOCK = re.compile(r"^(?:model\.diffusion_model\.)?joint_blocks\.(\d+)\.")
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler")
PATH_KEYS = {"text_encoder": "text_encoder_path", "text_encoder_2": "text_encoder_2_path",
             "text_encoder_3": "text_encoder_3_path"}
WHAT = {"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G", "text_encoder_3": "T5-XXL"}
KNOWN = {(24, False, False): "sd3", (24, True, True): "sd3.5-medium", (38, False, True): "sd3.5-large"}
"""(joint blocks, dual attention, q/k norms) → variant, as kohya's sd3_utils tells them apart."""


def is_sd3_layout(keys) -> bool:
    return any(JOINT_BLOCK.match(k) and ".x_block." in k for k in keys)


def architecture_of(keys) -> tuple[int, bool, bool]:
    depth = 1 + max(int(m.group(1)) for k in keys if (m := JOINT_BLOCK.match(k)))
    return depth, any(".x_block.attn2." in k for k in keys), any(".attn.ln_q." in k for k in keys)


def variant_from_keys(keys, path: Path, config) -> str:
    """model.family when set, else the SD3 variant whose architecture the keys have."""
    if config.family != "auto":
        return config.family
    depth, dual, qk = architecture_of(keys)
    if (depth, dual, qk) in KNOWN:
        return KNOWN[depth, dual, qk]
    if config.config_dir:
        return "sd3-custom"
    raise SingleFileError(
        f"model.path = '{path}': an SD3 transformer with {depth} joint blocks, {'with' if dual else 'no'} dual "
        f"attention and {'with' if qk else 'no'} q/k norms is none of SD3 medium (24, no, no), SD3.5 medium "
        "(24, with, with) or SD3.5 large (38, no, with); set model.config_dir to a diffusers config folder for it")


def has_t5(keys) -> bool:
    return any(k.startswith(T5_PREFIX) for k in keys)


def encoder_tensors(path: Path, role: str) -> dict:
    """A text encoder's tensors from its own file, under the role's SAI prefix: StabilityAI's and
    ComfyUI's `clip_l.safetensors` / `t5xxl_fp16.safetensors` hold transformers' names without one."""
    tensors = read_checkpoint(path)
    prefix = ENCODER_PREFIXES[role]
    own = {k: v for k, v in tensors.items() if k.startswith(prefix)}
    if own:
        return own
    if any(k.startswith(tuple(ENCODER_PREFIXES.values())) for k in tensors):
        raise SingleFileError(f"model.{PATH_KEYS[role]} = '{path}': holds other text encoders but no {WHAT[role]} "
                              f"('{prefix}...')")
    return {prefix + k: v for k, v in tensors.items() if k != "global_step"}


def load_single_file(path: Path, config) -> tuple[dict, str]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import (
        create_diffusers_clip_model_from_ldm,
        create_diffusers_t5_model_from_checkpoint,
    )
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from difftune.models.sd.single_file import tokenizer_for
    from difftune.models.sd3.encoders import load_encoder_folder, t5_tokenizer_for

    checkpoint = read_checkpoint(path)
    variant = variant_from_keys(list(checkpoint), path, config)
    config_dir = config_dir_for(path, config, variant, COMPONENTS)
    folder = str(config_dir)
    from_folders: dict = {}
    for role, key in PATH_KEYS.items():
        given = getattr(config, key)
        if not given or (role == "text_encoder_3" and not config.use_t5):
            continue
        source = Path(given).expanduser()
        if source.is_dir():
            from_folders.update(load_encoder_folder(source, role, config, f"model.{key}"))
        elif source.is_file():
            prefix = ENCODER_PREFIXES[role]
            checkpoint = {k: v for k, v in checkpoint.items() if not k.startswith(prefix)}
            checkpoint.update(encoder_tensors(source, role))
        else:
            raise SingleFileError(f"model.{key} = '{source}': not found (a folder or a .safetensors file)")
    keys = list(checkpoint)
    absent = [r for r in ("text_encoder", "text_encoder_2")
              if r not in from_folders and not any(k.startswith(ENCODER_PREFIXES[r]) for k in keys)]
    if absent:
        raise SingleFileError(f"model.path = '{path}': the file has no {' and no '.join(WHAT[r] for r in absent)}; set "
                              f"{' and '.join('model.' + PATH_KEYS[r] for r in absent)} to its folder or file "
                              "(StabilityAI ships them in text_encoders/)")
    if not any(k.startswith(VAE_PREFIX) for k in keys) and not config.vae_path:
        raise SingleFileError(f"model.path = '{path}': the file has no VAE ('{VAE_PREFIX}...'); set model.vae_path")
    use_t5 = config.use_t5 and ("text_encoder_3" in from_folders or has_t5(keys))
    parts: dict = {}
    try:
        parts["transformer"] = SD3Transformer2DModel.from_single_file(
            {k: v for k, v in checkpoint.items() if not k.startswith(("text_encoders.", VAE_PREFIX))},
            config=folder, subfolder="transformer", local_files_only=True)
        if any(k.startswith(VAE_PREFIX) for k in keys):
            parts["vae"] = AutoencoderKL.from_single_file(dict(checkpoint), config=folder, subfolder="vae",
                                                          local_files_only=True)
        for role in ("text_encoder", "text_encoder_2"):
            if role not in from_folders:
                parts[role] = create_diffusers_clip_model_from_ldm(
                    CLIPTextModelWithProjection, dict(checkpoint), subfolder=role, config=folder, local_files_only=True)
        if use_t5 and "text_encoder_3" not in from_folders:
            parts["text_encoder_3"] = create_diffusers_t5_model_from_checkpoint(
                T5EncoderModel, dict(checkpoint), subfolder="text_encoder_3", config=folder, local_files_only=True)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(config_dir, subfolder="scheduler",
                                                                    local_files_only=True)
    except READ_ERRORS as e:
        raise SingleFileError(f"model.path = '{path}': the weights do not fit the {variant} configs in '{config_dir}': "
                              f"{e}. For another SD3-layout architecture, set model.config_dir") from e
    if "text_encoder_3" in parts:
        parts["text_encoder_3"].tie_weights()  # the file's `shared` is also the encoder's token embedding
    check_fully_loaded(path, parts)
    for module in parts.values():
        module.eval()  # diffusers' CLIP/T5 helpers build them in training mode: T5's dropout would act
    parts.update(from_folders)
    for role, subfolder in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        parts.setdefault(subfolder, tokenizer_for(parts[role], config_dir, subfolder))
    if "text_encoder_3" in parts:
        where = f"model.text_encoder_3_path = '{config.text_encoder_3_path}'" if config.text_encoder_3_path \
            else f"model.path = '{path}'"
        parts.setdefault("tokenizer_3", t5_tokenizer_for(parts["text_encoder_3"], config_dir, config, where))
    parts["scheduler"] = scheduler
    if config.use_t5 and "text_encoder_3" not in parts:
        parts["load_notes"] = [f"'{path.name}' holds no T5-XXL and model.text_encoder_3_path is not set: training "
                               "without T5 (its part of the text embedding is zeros, as with model.use_t5 = false)"]
    return parts, variant

