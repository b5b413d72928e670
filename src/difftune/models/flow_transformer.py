"""What the flow-matching transformer families (Flux.1, SD3/3.5) do the same way, written once.

The adapters (`models/flux/adapter.py`, `models/sd3/adapter.py`) are dataclasses of their components
(`transformer`, `vae`, text encoders and tokenizers, `scheduler`, `family`, `source`, ...) that inherit
these methods and add their text encoding, conditioning, prediction, pipeline and file layouts.

Latents: the 16-channel VAE's mean (or a sample), shifted and scaled as the pipelines undo it,
`(z − shift_factor) · scaling_factor`. The objective is rectified flow (models/objectives.py).
"""

from __future__ import annotations

import torch

from difftune.errors import ConfigError
from difftune.models.objectives import FlowMatchObjective, check_objective_settings, make_flow_objective
from difftune.models.vae_latents import VAELatentModel, sample_distribution

FLOW_SAMPLERS = {"euler": "FlowMatchEulerDiscreteScheduler"}
"""Samplers the flow-matching pipelines take (their schedulers are flow-matching ones)."""


class FlowTransformerModel(VAELatentModel):
    default_timestep_sampling = "logit_normal"
    default_cfg_scale = 7.0
    """The guidance samples use unless sample.cfg_scale is set (SD3's pipeline default; Flux overrides)."""
    prediction_type = "flow"

    @property
    def native_resolution(self) -> int:
        return (getattr(self.transformer.config, "sample_size", None) or 128) * self.vae_scale_factor

    @property
    def training_scheduler(self):
        return self.scheduler

    @property
    def scheduler_shift(self) -> float:
        """The static shift of σ the model was trained with (SD3: 3.0); 1 when the scheduler shifts by
        resolution instead (Flux: `use_dynamic_shifting`, which is timestep_sampling = flux_shift here)."""
        config = self.scheduler.config
        return 1.0 if config.get("use_dynamic_shifting", False) else float(config.get("shift", 1.0))

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

    def sampling_scheduler(self, sampler: str):
        import diffusers

        if sampler not in FLOW_SAMPLERS:
            raise ConfigError(f"sample.sampler = {sampler!r}: {self.family} is a flow-matching model; its samplers "
                              f"are {', '.join(FLOW_SAMPLERS)}")
        return getattr(diffusers, FLOW_SAMPLERS[sampler]).from_config(self.scheduler.config)
