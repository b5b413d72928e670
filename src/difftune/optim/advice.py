"""What doctor and the trainer say about the optimizer and schedule: the effective LR, and warnings
from experience, each with its reason."""

from __future__ import annotations

from typing import TYPE_CHECKING

from difftune.optim.optimizers import (
    canonical_name,
    default_lr_range,
    get_spec,
    lr_ignored,
    lr_kind,
    lr_ratio_outside,
)
from difftune.optim.scaling import effective_lrs, lr_scale_factor
from difftune.optim.schedules import SCHEDULES, resolve_warmup

if TYPE_CHECKING:
    from difftune.config.schema import Config

# train.* keys that only some schedules read, with their defaults (a changed value elsewhere is a no-op).
SCHEDULE_KEY_DEFAULTS = {
    "lr_decay_steps": None, "lr_min": 0.0, "lr_cycles": 1, "lr_power": 1.0, "lr_gamma": None,
    "cycle_steps": None, "cyclic_mode": "triangular", "wsd_decay_ratio": 0.1,
}


def describe_lr(config: Config, total_steps: int) -> str:
    """One line: effective LR(s) after scale_lr, and the schedule with its warmup and decay."""
    train = config.train
    lrs = effective_lrs(train)
    unet_lr = lrs["denoiser"]
    encoders = _encoder_lrs(config)
    factor = lr_scale_factor(train)
    parts = [f"lr {unet_lr:.3g}"]
    if factor != 1.0:
        parts[0] += f" (= {train.lr:g} x {factor:.3g}, scale_lr {train.scale_lr} for batch {train.batch_size * train.grad_accum})"
    parts += [f"{role.replace('_', ' ')} lr {lr:.3g}" for role, lr in encoders.items() if lr != unet_lr]
    if canonical_name(config.optimizer.name) and lr_ignored(config):
        parts.append("(Adafactor computes its own LR; lr is not used)")
    schedule = train.lr_scheduler
    warmup = resolve_warmup(train, total_steps)
    if warmup:
        schedule += f", warmup {warmup} steps"
    if train.lr_decay_steps:
        schedule += f", decay over {train.lr_decay_steps} steps"
    parts.append(f"schedule {schedule}")
    return ", ".join(parts)


def lr_summary(config: Config, total_steps: int) -> dict[str, str]:
    """Extra lines for doctor's report."""
    train = config.train
    lrs = effective_lrs(train)
    unet_lr = lrs["denoiser"]
    lines = {
        "optimizer": config.optimizer.name,
        "effective lr": f"{unet_lr:.4g}" + (f" ({train.lr:g} x {lr_scale_factor(train):.4g}, scale_lr = "
                                            f"{train.scale_lr})" if train.scale_lr != "none" else ""),
    }
    for role, lr in _encoder_lrs(config).items():
        lines[f"{role.replace('_', ' ')} lr"] = f"{lr:.4g}"
    lines["lr schedule"] = describe_lr(config, total_steps).split("schedule ", 1)[-1]
    return lines


def optimizer_warnings(config: Config, total_steps: int) -> list[str]:
    """Advice from experience; each warning says why."""
    train, opt = config.train, config.optimizer
    name = canonical_name(opt.name)
    if name is None:
        return []
    spec = get_spec(name)
    warnings = []
    lrs = effective_lrs(train)
    # textual inversion alone trains its vectors only: their LR is the one to judge
    unet_lr = lrs["embedding"] if lr_kind(config.network) == "embedding" else lrs["denoiser"]
    if spec.lr_free:
        if train.lr != 1.0:
            warnings.append(
                f"{name} with train.lr = {train.lr:g}: for LR-free optimizers lr multiplies the step size they "
                "estimate and should stay 1.0; tune d_coef (prodigy) or leave it"
            )
        unequal = [lr for lr in _encoder_lrs(config).values() if lr not in (0.0, unet_lr)]
        if train.train_unet and unequal:
            warnings.append(f"{name} with unequal group LRs ({unet_lr:g} vs {unequal[0]:g}): one step size is adapted "
                            "for all groups")
    if name == "sgdnesterov8bit":
        from difftune.optim.optimizers import NESTEROV_8BIT

        warnings.append(f"sgdnesterov8bit: {NESTEROV_8BIT}")
    adaptive_adafactor = name == "adafactor" and lr_ignored(config)
    if adaptive_adafactor and train.lr_scheduler != "adafactor":
        warnings.append(
            f"adaptive Adafactor (relative_step = true) with lr_scheduler = {train.lr_scheduler!r}: Adafactor computes "
            "its own LR, so this schedule changes nothing and the logged LR is not the one used; use "
            "lr_scheduler = 'adafactor', or relative_step = false and scale_parameter = false for a fixed LR"
        )
    if spec.schedule_free and train.lr_scheduler not in ("constant", "constant_with_warmup"):
        warnings.append(
            f"{name} with lr_scheduler = {train.lr_scheduler!r}: schedule-free optimizers replace the decay with "
            "weight averaging and expect a constant LR (warmup is fine)"
        )
    decay_end = train.lr_decay_steps or total_steps
    if train.lr_scheduler == "cosine" and decay_end < total_steps:
        warnings.append(
            f"cosine decay ends at step {decay_end} (train.lr_decay_steps) but the run has {total_steps} steps: "
            f"past the decay the LR climbs back up (to lr at step {2 * decay_end - resolve_warmup(train, total_steps)}) "
            "as in EveryDream2; set lr_decay_steps >= the run length for a plain decay"
        )
    warmup = resolve_warmup(train, total_steps)
    if train.lr_decay_steps and warmup >= train.lr_decay_steps:
        warnings.append(
            f"warmup ({warmup} steps) does not end before the decay does (train.lr_decay_steps = "
            f"{train.lr_decay_steps}): the schedule jumps from the end of warmup straight into its tail"
        )
    if total_steps and warmup > 0.5 * total_steps and train.lr_scheduler != "one_cycle":
        warnings.append(
            f"warmup of {warmup} steps is {warmup / total_steps:.0%} of the {total_steps}-step run: most of the run "
            "trains below the configured LR (fine for an LR range test, not for a normal run)"
        )
    alpha, rank = getattr(config.network, "alpha", None), getattr(config.network, "rank", None)
    if isinstance(alpha, (int, float)) and isinstance(rank, (int, float)) and rank and alpha > rank:
        warnings.append(
            f"network.alpha = {alpha:g} > network.rank = {rank:g}: LoRA updates are scaled by alpha / rank = "
            f"{alpha / rank:.3g} > 1, which amplifies the effective LR; alpha is usually rank or rank / 2"
        )
    if not adaptive_adafactor and not spec.lr_free:
        lr_is_for = lr_kind(config.network)
        low, high = default_lr_range(name, lr_is_for)
        kind = {"full": "full fine-tune", "network": "LoRA", "embedding": "textual inversion"}[lr_is_for]
        ratio = lr_ratio_outside(unet_lr, low, high)
        if ratio > 1.0:
            side = "below" if unet_lr < low else "above"
            warnings.append(
                f"lr {unet_lr:.3g} is {side} the usual range for {name} ({kind}: {low * 10:.3g} to {high / 10:.3g}) "
                f"by more than 10x: expect {'no visible learning' if side == 'below' else 'divergence or burned samples'}; "
                "`difftune find-lr` measures it"
            )
    schedule = SCHEDULES.get(train.lr_scheduler)
    if schedule is not None:
        for key, default in SCHEDULE_KEY_DEFAULTS.items():
            value = getattr(train, key)
            if value != default and key not in schedule.keys:
                warnings.append(f"train.{key} = {value!r} has no effect with lr_scheduler = {train.lr_scheduler!r}")
    return warnings


def _encoder_lrs(config) -> dict[str, float]:
    """LR of each text encoder the config trains (after scale_lr)."""
    from difftune.optim.preview import group_base_lrs

    return {role: lr for role, lr in group_base_lrs(config).items() if role != "denoiser"}
