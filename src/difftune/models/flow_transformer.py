"""What the flow-matching transformer families (Flux.1, SD3/3.5) do the same way, written once.

The adapters (`models/flux/adapter.py`, `models/sd3/adapter.py`) are dataclasses of their components
(`transformer`, `vae`, text encoders and tokenizers, `scheduler`, `family`, `source`, ...) that inherit
these methods and add their text encoding, conditioning, prediction, pipeline and file layouts.

Latents: the 16-channel VAE's mean (or a sample), shifted and scaled as the pipelines undo it,
`(z − shift_factor) · scaling_factor`. The objective is rectified flow (models/objectives.py).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from difftune.errors import ConfigError
from difftune.models.base import count_parameters
from difftune.models.latent_unet import encode_distribution, sample_distribution
from difftune.models.objectives import FlowMatchObjective, check_objective_settings, make_flow_objective

FLOW_SAMPLERS = {"euler": "FlowMatchEulerDiscreteScheduler"}
"""Samplers the flow-matching pipelines take (their schedulers are flow-matching ones)."""


class FlowTransformerModel:
    default_timestep_sampling = "logit_normal"
    default_cfg_scale = 7.0
    """The guidance samples use unless sample.cfg_scale is set (SD3's pipeline default; Flux overrides)."""
    prediction_type = "flow"

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return (getattr(self.transformer.config, "sample_size", None) or 128) * self.vae_scale_factor

    @property
    def scheduler_shift(self) -> float:
        """The static shift of σ the model was trained with (SD3: 3.0); 1 when the scheduler shifts by
        resolution instead (Flux: `use_dynamic_shifting`, which is timestep_sampling = flux_shift here)."""
        config = self.scheduler.config
        return 1.0 if config.get("use_dynamic_shifting", False) else float(config.get("shift", 1.0))

    @property
    def notes(self) -> list[str]:
        return []

    def denoiser_blocks(self) -> list[torch.nn.Module]:
        """The transformer's blocks in forward order (block swap and gradient checkpointing act on them)."""
        blocks = []
        for name in ("transformer_blocks", "single_transformer_blocks"):
            blocks += list(getattr(self.transformer, name, None) or [])
        return blocks

    def make_objective(self, train=None) -> FlowMatchObjective:
        if train is None:
            return FlowMatchObjective(sampling=self.default_timestep_sampling, shift=self.scheduler_shift)
        check_objective_settings(train, "flow", self.family)
        return make_flow_objective(train, self.scheduler_shift, self.default_timestep_sampling)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents_from_distribution(*self.encode_latent_distribution(pixels), generator)

    @torch.no_grad()
    def encode_latent_distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) in raw VAE space, in the VAE's dtype on its device (see LatentUNetModel's)."""
        return encode_distribution(self.vae, pixels)

    def latents_from_distribution(self, mean: torch.Tensor, std: torch.Tensor,
                                  generator: torch.Generator | None = None) -> torch.Tensor:
        """A sample of a stored distribution (the mean without a generator), shifted and scaled."""
        config = self.vae.config
        return (sample_distribution(mean, std, generator).float() - (config.shift_factor or 0.0)) * config.scaling_factor

    def text_token_counts(self, captions: list[str]) -> tuple[list[int], int]:
        """Counted by the encoder that reads the most (T5 when present, else CLIP)."""
        tokenizer, limit = self.longest_reading_tokenizer()
        ids = tokenizer(captions, truncation=False, padding=False).input_ids
        return [len(i) for i in ids], limit

    def save_pretrained(self, path: Path, dtype: torch.dtype = torch.float32) -> None:
        pipe = self.pipeline("euler")
        pipe.scheduler = self.scheduler  # the training scheduler config, as the folder was loaded
        if dtype != torch.float32:
            pipe = copy.deepcopy(pipe).to(dtype=dtype)  # convert copies, never the live training modules
        pipe.save_pretrained(str(path), safe_serialization=True)

    def sampling_scheduler(self, sampler: str):
        import diffusers

        if sampler not in FLOW_SAMPLERS:
            raise ConfigError(f"sample.sampler = {sampler!r}: {self.family} is a flow-matching model; its samplers "
                              f"are {', '.join(FLOW_SAMPLERS)}")
        return getattr(diffusers, FLOW_SAMPLERS[sampler]).from_config(self.scheduler.config)

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "prediction_type": self.prediction_type,
            "source": self.source,
            **{f"{role}_parameters": count_parameters(module) for role, module in self.parts.items()},
            "vae_scale_factor": self.vae_scale_factor,
        }
