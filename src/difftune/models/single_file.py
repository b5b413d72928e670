"""Load a single-file Stable Diffusion checkpoint (.safetensors / .ckpt, the A1111/ComfyUI layout).

diffusers converts the original (LDM) key layout; what it needs from a hub — the component configs
and the tokenizer — ships inside difftune instead: `models/configs/<family>/` holds the diffusers
configs of SD 1.x, SD 2.x (512 px, epsilon) and SD 2.x-v (768 px, v-prediction), and the CLIP BPE
tokenizer is built from the vocabulary in the `open_clip_torch` wheel. Nothing is fetched.
"""

from __future__ import annotations

import pickle
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    create_diffusers_clip_model_from_ldm,
    load_single_file_checkpoint,
)
from transformers import CLIPTextModel

from difftune.config.schema import ModelConfig
from difftune.errors import SingleFileError  # noqa: F401  (re-exported for callers)
from difftune.models.clip_tokenizers import (
    BYTE_LEVEL_VOCAB_SIZE,
    byte_level_clip_tokenizer,
    openai_clip_tokenizer,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_KEY = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
OPEN_CLIP_KEY = "cond_stage_model.model.token_embedding.weight"
CROSS_ATTENTION_KEY = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
SD2_BASE_GLOBAL_STEP = 875000  # SD 2.x-base (epsilon) checkpoints carry this step; the 768-v ones do not

# Key fragments of architectures that are not SD 1.x/2.x, for a clear "not supported yet".
OTHER_ARCHITECTURES = {
    "conditioner.embedders.1.model.": "SDXL",
    "conditioner.embedders.0.model.": "SDXL refiner",
    "text_encoders.clip_g.": "SD3",
    "joint_blocks.": "SD3",
    "double_blocks.": "Flux",
}

_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError)




def shipped_config_dir(family: str) -> Path:
    """The diffusers config folder difftune ships for `family` ("sd1", "sd2", "sd2-v")."""
    return Path(str(resources.files("difftune.models") / "configs" / family))


def detect_family(checkpoint: dict[str, torch.Tensor], path: Path) -> str:
    """sd1 / sd2 / sd2-v from the weights; raises for other architectures with what they are."""
    for fragment, name in OTHER_ARCHITECTURES.items():
        if any(fragment in key for key in list(checkpoint)[:4000]):
            raise SingleFileError(
                f"model.path = '{path}': this is a {name} checkpoint; difftune supports Stable Diffusion 1.x/2.x "
                "single files for now (SDXL, SD3 and Flux adapters come in a later release)"
            )
    if CROSS_ATTENTION_KEY not in checkpoint:
        raise SingleFileError(
            f"model.path = '{path}': no Stable Diffusion UNet found (missing key '{CROSS_ATTENTION_KEY}'). "
            "Expected an SD 1.x/2.x checkpoint in the original (A1111/ComfyUI) layout; a LoRA file goes in "
            "network.init_from, a diffusers model is a folder with model_index.json"
        )
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


def load_single_file(path: Path, config: ModelConfig) -> tuple[dict, str]:
    """Components of the checkpoint at `path` and its family name.

    `model.family` overrides detection (e.g. "sd2" for a 512-px SD 2.x-base file without its
    training step); `model.config_dir` replaces the shipped configs (any SD-layout architecture).
    """
    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    except _ERRORS as e:
        if _refused_pickle(e):
            raise SingleFileError(
                f"model.path = '{path}': refused as unsafe: this pickled checkpoint holds objects other than "
                "tensors, and unpickling them could run code (difftune reads .ckpt files with "
                "torch.load(weights_only=True) only). Use a .safetensors version of the model; if you trust the "
                "file's source, convert it yourself: python -c \"import torch, safetensors.torch as st; "
                f"sd = torch.load('{path.name}', weights_only=False); sd = sd.get('state_dict', sd); "
                f"st.save_file({{k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}}, "
                f"'{path.stem}.safetensors')\""
            ) from None
        raise SingleFileError(f"model.path = '{path}': could not read the checkpoint file: {e}") from e
    checkpoint = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor) or k == "global_step"}
    if config.config_dir:
        config_dir = Path(config.config_dir).expanduser()
        if not (config_dir / "unet" / "config.json").is_file():
            raise SingleFileError(
                f"model.config_dir = '{config_dir}': expected a diffusers config folder with unet/, vae/, "
                "text_encoder/ and scheduler/ configs"
            )
        family = config.family if config.family != "auto" else "sd-custom"
    else:
        family = config.family if config.family != "auto" else detect_family(checkpoint, path)
        config_dir = shipped_config_dir(family)
    try:
        unet = UNet2DConditionModel.from_single_file(checkpoint, config=str(config_dir), subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_single_file(checkpoint, config=str(config_dir), subfolder="vae", local_files_only=True)
        text_encoder = create_diffusers_clip_model_from_ldm(
            CLIPTextModel, checkpoint, subfolder="text_encoder", config=str(config_dir), local_files_only=True
        )
        scheduler = DDPMScheduler.from_pretrained(config_dir, subfolder="scheduler", local_files_only=True)
    except _ERRORS as e:
        raise SingleFileError(
            f"model.path = '{path}': the weights do not fit the {family} configs in '{config_dir}': {e}. "
            "If this is another SD-layout architecture, set model.config_dir (and model.family)"
        ) from e
    _check_fully_loaded(path, {"unet": unet, "vae": vae, "text_encoder": text_encoder})
    parts = {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": _tokenizer_for(text_encoder, config_dir),
        "noise_scheduler": scheduler,
    }
    return parts, family


def _refused_pickle(error: BaseException) -> bool:
    """torch.load(weights_only=True) refused a pickle global (diffusers re-raises it as an OSError)."""
    while error is not None:
        if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


def _tokenizer_for(text_encoder: CLIPTextModel, config_dir: Path):
    """A tokenizer folder next to the configs wins; else the CLIP BPE (SD1: padded with EOS, SD2: "!")."""
    from transformers import CLIPTokenizer

    if (config_dir / "tokenizer").is_dir():
        return CLIPTokenizer.from_pretrained(config_dir, subfolder="tokenizer", local_files_only=True)
    vocab = text_encoder.config.vocab_size
    if vocab == 49408:
        return openai_clip_tokenizer(pad_token="!" if text_encoder.config.hidden_size == 1024 else "<|endoftext|>")
    if vocab == BYTE_LEVEL_VOCAB_SIZE:
        return byte_level_clip_tokenizer()
    raise SingleFileError(
        f"text encoder vocabulary of {vocab} tokens has no built-in tokenizer; add a tokenizer/ folder "
        f"(vocab.json + merges.txt) to model.config_dir '{config_dir}'"
    )


def _check_fully_loaded(path: Path, modules: dict[str, torch.nn.Module]) -> None:
    """diffusers loads single files non-strictly: weights absent from the file would stay uninitialised."""
    for name, module in modules.items():
        missing = [n for n, p in module.named_parameters() if p.is_meta]
        if missing:
            raise SingleFileError(
                f"model.path = '{path}': the file has no weights for {len(missing)} {name} parameter(s), "
                f"e.g. {', '.join(missing[:3])}; it is incomplete or of another architecture"
            )
