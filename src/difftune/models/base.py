"""The seam between the trainer and a model family.

The training step, validation, the tuners, the networks and the exports talk to a family only
through this protocol (and its `Objective`, models/objectives.py). A family lives in one folder under
`models/` and registers itself in `models/registry.py`; nothing else names it.

    text = model.encode_text(batch.captions)            # cacheable: depends on the captions only
    cond = model.condition(text, batch)                 # + per-image conditioning (SDXL's time ids)
    t = objective.sample_t(n, g); noisy = objective.noisy(x0, noise, t)
    loss = objective.weight(t) * mse(model.predict(noisy, t, cond), objective.target(x0, noise, t))

Parts are addressed by role: "denoiser" (the UNet or transformer), "text_encoder", "text_encoder_2",
"vae". Each trained role gets its own LR group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from difftune.data.batch import Batch
from difftune.models.objectives import Objective

DENOISER = "denoiser"
VAE = "vae"


@runtime_checkable
class DiffusionModel(Protocol):
    family: str
    """The model's variant as files name it ("sd1", "sd2-v", "sdxl", "tiny-sd", ...)."""
    prediction_type: str
    parts: dict[str, nn.Module]
    """Modules by role: "denoiser", "text_encoder"[, "text_encoder_2"], "vae"."""
    text_encoder_roles: tuple[str, ...]
    kohya_prefixes: dict[str, str]
    """Role → the kohya LoRA name prefix of its layers ("lora_unet", "lora_te" or "lora_te1"/"lora_te2")."""
    diffusers_prefixes: dict[str, str]
    """Role → the diffusers/PEFT LoRA key prefix ("unet", "text_encoder", "text_encoder_2")."""
    lora_presets: dict[str, dict[str, Any]]
    """LyCORIS layer selections by preset name for this family's module classes."""
    notes: list[str]
    """Load-time warnings the trainer shows (e.g. a setting this family ignores)."""
    default_cfg_scale: float
    """Guidance of samples when sample.cfg_scale is unset (Flux.1-dev: its distilled 3.5)."""
    # Optional: `kohya_file_name(role, module_path) -> str | None` when the family's kohya files name
    # layers otherwise than LyCORIS does (SDXL: SGM UNet paths); see checkpoint/lora_formats.file_name.
    # Optional, for textual inversion (network/textual_inversion.py): `embedding_keys` (role → the key of
    # its vectors in embedding files, from the registry line) and `tokenizers` (role → CLIP tokenizer).

    @property
    def device(self) -> torch.device: ...

    def make_objective(self, train=None) -> Objective:
        """The family's objective with the loss settings of `train` (a TrainConfig; None: defaults)."""
        ...

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] → latents as the denoiser sees them; the mean when no generator is given."""
        ...

    def encode_latent_distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE's latent distribution in raw VAE space: what the latent cache stores."""
        ...

    def latents_from_distribution(self, mean: torch.Tensor, std: torch.Tensor,
                                  generator: torch.Generator | None = None) -> torch.Tensor:
        """A sample (the mean without a generator) of a stored distribution, as the denoiser sees latents."""
        ...

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Text-encoder outputs (grad flows when an encoder trains); depends on the captions only."""
        ...

    def condition(self, text: dict[str, torch.Tensor], batch: Batch) -> dict[str, Any]:
        """Keyword arguments of `predict` for this batch: the text outputs plus per-image conditioning."""
        ...

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor: ...

    def text_token_counts(self, captions: list[str]) -> tuple[list[int], int]:
        """Tokens per caption and how many the text encoder reads (longer captions are cut)."""
        ...

    @property
    def native_resolution(self) -> int:
        """Side length the denoiser's config was made for (default size of `difftune sample`)."""
        ...

    def pipeline(self, sampler: str = "euler") -> Any:
        """The family's diffusers pipeline over the live modules (samples, `difftune sample`)."""
        ...

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Extra arguments of that pipeline's call that reproduce how the model was trained (clip_skip)."""
        ...

    def save_pretrained(self, path: Path, dtype: torch.dtype = torch.float32) -> None:
        """A diffusers folder that the family's pipeline `from_pretrained` loads."""
        ...

    def save_single_file(self, path: Path, dtype: torch.dtype, metadata: dict[str, str]) -> None:
        """One .safetensors in the layout A1111/Forge/ComfyUI load as a checkpoint."""
        ...

    def lora_metadata(self) -> dict[str, str]:
        """The family's kohya `ss_*` / modelspec keys for LoRA files (base model version, architecture)."""
        ...

    def describe(self) -> dict[str, Any]: ...


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def text_encoders(model: DiffusionModel) -> list[nn.Module]:
    return [model.parts[role] for role in model.text_encoder_roles]
