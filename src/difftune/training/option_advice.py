"""Warnings about training options that do nothing or do not make sense together, with the reason.

doctor prints them (with the prediction type it knows from the model's facts) and the trainer prints
them again once the model is loaded. Errors (a setting of the other objective, an empty timestep
range) are raised where the setting is read; these are the combinations that run but are not what
the user meant.
"""

from __future__ import annotations

from difftune.config.schema import Config
from difftune.training.noise import offset_noise_strength


def option_warnings(config: Config, prediction_type: str | None, total_steps: int | None = None) -> list[str]:
    train, warnings = config.train, ema_warnings(config, total_steps)
    chosen = train.model_fields_set
    if train.zero_frequency_noise_ratio:
        warnings.append(f"train.zero_frequency_noise_ratio = {train.zero_frequency_noise_ratio} is EveryDream2's name "
                        "for offset noise: difftune trains it as train.noise_offset (kohya's name)")
    if train.zero_terminal_snr and prediction_type == "epsilon":
        warnings.append("train.zero_terminal_snr with an epsilon-prediction model: at the last timestep the input "
                        "is pure noise, so predicting the noise is trivial and teaches nothing about the image "
                        "(Lin et al. 2023 pair it with v-prediction); set model.prediction_type = 'v_prediction' "
                        "to convert the model, or leave zero_terminal_snr off")
    if train.loss_type in ("l2", "l1"):
        unused = sorted(chosen & {"huber_c", "huber_schedule", "huber_scale"})
        if unused:
            warnings.append(f"train.{', train.'.join(unused)} only shape the huber and smooth_l1 losses; "
                            f"train.loss_type = {train.loss_type!r} does not read them")
    elif train.huber_schedule == "snr" and "huber_scale" in chosen:
        warnings.append("train.huber_scale multiplies the constant and exponential Huber thresholds; the snr "
                        "schedule does not read it (as in kohya)")
    pairs = [("noise_offset_random_strength", train.noise_offset_random_strength,
              offset_noise_strength(train), "train.noise_offset"),
             ("input_perturbation_random_strength", train.input_perturbation_random_strength,
              train.input_perturbation, "train.input_perturbation"),
             ("multires_noise_discount", "multires_noise_discount" in chosen, train.multires_noise_iterations,
              "train.multires_noise_iterations")]
    for name, is_set, needs, what in pairs:
        if is_set and not needs:
            warnings.append(f"train.{name} has no effect while {what} is 0")
    if train.min_snr_gamma is not None and train.debiased_estimation:
        warnings.append("train.min_snr_gamma and train.debiased_estimation both reweight the loss by SNR and "
                        "multiply: the low-noise timesteps get both cuts. Usually one is used")
    if train.input_perturbation > 0.2:
        warnings.append(f"train.input_perturbation = {train.input_perturbation}: the paper and diffusers use 0.1; "
                        "much more makes the model learn to remove noise that is not there")
    return warnings


def ema_warnings(config: Config, total_steps: int | None) -> list[str]:
    """An EMA that would still be mostly the starting weights when the run ends; EMA settings that are off."""
    ema, warnings = config.ema, []
    if not ema.enabled:
        chosen = sorted(ema.model_fields_set - {"enabled"})
        if chosen:
            warnings.append(f"ema.{', ema.'.join(chosen)} set but ema.enabled = false: no EMA is kept")
        return warnings
    if total_steps:
        from difftune.training.ema import start_weight_left

        left = start_weight_left(total_steps, ema.decay, ema.warmup, ema.update_every, ema.inv_gamma, ema.power)
        if left > 0.5:
            warnings.append(f"ema.decay = {ema.decay} spans about {1 / (1 - ema.decay):.0f} steps, and the run has "
                            f"{total_steps}: at its end {100 * left:.0f}% of the EMA is still the starting weights, so "
                            "the EMA barely moves from them. Lower the decay (about "
                            f"{1 - 4 / total_steps:.4g} spans a quarter of the run) or set ema.warmup = true")
    if not ema.use_for:
        warnings.append("ema.use_for = []: the EMA is kept and saved (in each save's ema/ folder) but nothing "
                        "validates, samples or exports with it by default")
    if _schedule_free(config.optimizer.name):
        warnings.append("ema with a schedule-free optimizer: it already averages its iterates for evaluation; "
                        "the EMA averages the training weights, which is seldom better")
    return warnings


def _schedule_free(name: str) -> bool:
    from difftune.optim.optimizers import canonical_name, get_spec

    canonical = canonical_name(name)
    return canonical is not None and get_spec(canonical).schedule_free  # unknown: the config check's error


def ema_line(config: Config) -> str | None:
    """doctor's summary of the EMA, or None without one."""
    ema = config.ema
    if not ema.enabled:
        return None
    warm = f", warmup (power {ema.power:.3g})" if ema.warmup else ""
    every = f", every {ema.update_every} steps" if ema.update_every > 1 else ""
    uses = ", ".join(ema.use_for) or "nothing"
    return f"decay {ema.decay} (~{1 / (1 - ema.decay):.0f} steps){warm}{every}, on {ema.device}; used for {uses}"


def loss_and_noise_lines(config: Config) -> dict[str, str]:
    """doctor's one-line summaries of the loss and the noise, when they are not the plain defaults."""
    train, lines = config.train, {}
    loss = [train.loss_type]
    if train.loss_type in ("huber", "smooth_l1"):
        loss[0] += f" (huber_c {train.huber_c}, {train.huber_schedule} schedule)"
    if train.min_snr_gamma is not None:
        loss.append(f"Min-SNR gamma {train.min_snr_gamma}")
    if train.debiased_estimation:
        loss.append("debiased estimation")
    if train.zero_terminal_snr:
        loss.append("zero terminal SNR")
    if train.min_timestep is not None or train.max_timestep is not None:
        loss.append(f"timesteps [{train.min_timestep or 0}, {train.max_timestep or 'T'})")
    if loss != ["l2"]:
        lines["loss"] = ", ".join(loss)
    noise = []
    offset = offset_noise_strength(train)
    if offset:
        noise.append(f"offset {offset}" + (" (random strength)" if train.noise_offset_random_strength else ""))
    if train.multires_noise_iterations:
        noise.append(f"pyramid {train.multires_noise_iterations} levels, discount {train.multires_noise_discount}")
    if train.input_perturbation:
        noise.append(f"input perturbation {train.input_perturbation}"
                     + (" (random strength)" if train.input_perturbation_random_strength else ""))
    if noise:
        lines["noise"] = ", ".join(noise)
    if (ema := ema_line(config)) is not None:
        lines["ema"] = ema
    return lines
