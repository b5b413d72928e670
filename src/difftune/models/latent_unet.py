"""What every latent-UNet family (SD 1.x/2.x, SDXL) does the same way, written once.

The adapters (`models/sd/adapter.py`, `models/sdxl/adapter.py`) are dataclasses of their components
(`unet`, `vae`, `tokenizer`, `noise_scheduler`, `family`, `source`, ...) that inherit these methods and
add their own text encoding, conditioning, pipeline and file layouts.
"""

from __future__ import annotations

from typing import Any

import torch

from difftune.models.clip_tokenizers import expand_multi_vector_tokens
from difftune.models.objectives import DDPMObjective
from difftune.models.vae_latents import VAELatentModel, sample_distribution


def zero_terminal_snr_schedule(scheduler):
    """The same DDPM schedule with its betas rescaled to zero terminal SNR (diffusers' rescale_betas_zero_snr)
    and trailing timestep spacing, which samplers need to start from the pure-noise step (Lin et al. 2023)."""
    return type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")


class LatentUNetModel(VAELatentModel):
    default_cfg_scale = 7.0
    """The guidance samples use unless sample.cfg_scale is set."""

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def native_resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def make_objective(self, train=None) -> DDPMObjective:
        """DDPM over the model's noise schedule; `train` (a TrainConfig) gives the loss settings (Min-SNR,
        debiased estimation, the timestep range, the element-wise loss). The flow-matching settings do
        not apply to these models: setting one is an error rather than silently ignored.

        train.zero_terminal_snr replaces the model's own schedule with the rescaled one, so the samples,
        validation and the saved folder's scheduler config all use what the model was trained on."""
        if train is None:
            return DDPMObjective(self.noise_scheduler)
        from difftune.models.element_loss import ElementLoss
        from difftune.models.objectives import check_objective_settings

        check_objective_settings(train, "ddpm", self.family)
        if train.zero_terminal_snr:
            self.noise_scheduler = zero_terminal_snr_schedule(self.noise_scheduler)
        objective = DDPMObjective(self.noise_scheduler, train.min_snr_gamma, train.debiased_estimation,
                                  train.min_timestep or 0, train.max_timestep, ElementLoss.from_train(train))
        low, high = objective.timestep_range
        if not 0 <= low < high <= objective.num_train_timesteps:
            from difftune.errors import ConfigError

            raise ConfigError(f"train.min_timestep = {train.min_timestep}, train.max_timestep = {train.max_timestep}: "
                              f"need 0 <= min_timestep < max_timestep <= {objective.num_train_timesteps} (the "
                              "schedule's timesteps; max_timestep is one past the highest drawn)")
        return objective

    def text_token_counts(self, captions: list[str]) -> tuple[list[int], int]:
        ids = self.tokenizer(expand_multi_vector_tokens(self.tokenizer, captions), truncation=False,
                             padding=False).input_ids
        return [len(i) for i in ids], self.tokenizer.model_max_length

    @property
    def training_scheduler(self):
        return self.noise_scheduler

    def latents_from_distribution(self, mean: torch.Tensor, std: torch.Tensor,
                                  generator: torch.Generator | None = None) -> torch.Tensor:
        """The denoiser's latents of a stored distribution: a sample (the mean without a generator), scaled."""
        return sample_distribution(mean, std, generator).float() * self.vae.config.scaling_factor

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return self.unet(noisy, t, **cond).sample
