"""Public entry of the optimizer and LR-schedule registries.

`check_*` validate names and settings at config load (before any model loads) and return problems
as lines; `build_*` construct the objects for training. The catalogue itself lives in
`optimizers.py` (optimizers), `schedules.py` (schedule formulas), `scaling.py` (scale_lr) and
`hooks.py` (stochastic rounding, fused backward pass).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from difftune.optim.optimizers import (
    OPTIMIZERS,
    OptimizerSpec,
    canonical_name,
    default_lr_range,
    dry_build_problem,
    get_spec,
    instantiate,
    optimizer_kwargs,
    resolve_settings,
    suggest,
    user_settings,
    usual_lr,
)
from difftune.optim.scaling import effective_lrs, lr_scale_factor
from difftune.optim.schedules import SCHEDULES, ScheduleFn, multiplier_fn, params_from_config

if TYPE_CHECKING:
    import torch

    from difftune.config.schema import Config

__all__ = [
    "OPTIMIZERS", "SCHEDULES", "ScheduleFn", "build_optimizer", "build_scheduler", "check_optimizer_config",
    "check_scheduler_config", "default_lr_range", "effective_lrs", "get_spec", "lr_multiplier",
    "lr_scale_factor", "optimizer_kwargs", "usual_lr",
]


# ---------------------------------------------------------------------------------------- checks
def check_optimizer_config(config: Config, libraries: bool = True) -> list[str]:
    """Problems with optimizer.*, and with the train.* keys that only make sense with some optimizers.
    `libraries` = False: without the checks that import the optimizer's library (its settings, by its
    signature, and a dry construction)."""
    opt, train = config.optimizer, config.train
    spec_name = canonical_name(opt.name)
    if spec_name is None:
        return [f"optimizer.name = {opt.name!r}: unknown optimizer{suggest(opt.name)} "
                f"Valid: {', '.join(OPTIMIZERS)}"]
    spec = OPTIMIZERS[spec_name]
    kwargs, problems = resolve_settings(spec, user_settings(opt)) if libraries else ({}, [])
    problems += _group_lr_problems(spec, config)
    problems += _precision_problems(spec, config)
    if spec.lr_free and train.scale_lr != "none":
        problems.append(
            f"train.scale_lr = {train.scale_lr!r}: {spec.name} estimates its own step size and train.lr only "
            "multiplies it, so batch scaling does not apply; set train.scale_lr = 'none'"
        )
    if not problems and libraries and _departs_from_defaults(spec, kwargs):
        problem = dry_build_problem(spec, kwargs, train.lr)
        if problem:
            problems.append(problem)
    return problems


def _departs_from_defaults(spec: OptimizerSpec, kwargs: dict[str, Any]) -> bool:
    """Whether a setting differs from both the library's default and difftune's own (tests build every
    optimizer with those): only then can the library refuse it, so only then is the dry construction
    worth its cost (torch's first optimizer imports torch._dynamo: about a second of doctor's start)."""
    known = {**spec.accepted_settings(), **spec.defaults}
    return any(name not in known or _differs(known[name], value) for name, value in kwargs.items())


def _differs(default: Any, value: Any) -> bool:
    try:
        return bool(default != value) if not isinstance(default, tuple) else tuple(default) != tuple(value)
    except Exception:  # values that do not compare (tensors): try the construction
        return True


def _group_lr_problems(spec: OptimizerSpec, config: Config) -> list[str]:
    """D-Adapt and Prodigy adapt one step size for all groups: pytorch-optimizer's D-Adapt silently uses
    the first group's lr for every group and prodigyopt stops with an error mid-run. So unequal group
    LRs are refused here rather than adjusted behind the user's back."""
    train = config.train
    pivotal = config.network.pivotal and train.embedding_lr not in (None, train.lr)
    if not (spec.equal_group_lr and ((train.train_unet and train.train_text_encoder) or pivotal)):
        return []
    problems = []
    for key in ("text_encoder_lr", "text_encoder_2_lr", "embedding_lr"):
        te = getattr(train, key)
        if te is None or te == train.lr or te == 0.0:
            continue
        problems.append(
            f"train.{key} = {te!r}: {spec.name} adapts one step size for all parameter groups and needs "
            f"the same lr in each (train.lr = {train.lr!r}); leave train.{key} unset, set it equal to "
            + ("train.lr" if key == "embedding_lr" else "train.lr, or set it to 0 to freeze that text encoder's updates")
        )
    return problems


def _precision_problems(spec: OptimizerSpec, config: Config) -> list[str]:
    opt, train = config.optimizer, config.train
    problems = []
    if opt.stochastic_rounding and train.weight_dtype != "bf16":
        problems.append(
            "optimizer.stochastic_rounding = true: only bf16 weights are rounded; set train.weight_dtype = 'bf16' "
            "(with train.mixed_precision = 'bf16') or turn stochastic_rounding off"
        )
    if train.weight_dtype == "bf16" and config.network.type not in (None, "none"):
        problems.append(
            f"train.weight_dtype = 'bf16' applies to full fine-tunes; a {config.network.type} network's weights are "
            "small and stay fp32 (the frozen base model is stored in the autocast dtype on GPU anyway)"
        )
    if train.weight_dtype == "bf16" and train.mixed_precision != "bf16":
        problems.append(
            f"train.weight_dtype = 'bf16' needs train.mixed_precision = 'bf16' (got {train.mixed_precision!r}): "
            "bf16 weights only run inside bf16 autocast"
        )
    if opt.fused_back_pass:
        if train.grad_accum > 1:
            problems.append(
                f"optimizer.fused_back_pass = true steps each parameter during backward and frees its gradient, so "
                f"gradients cannot accumulate: train.grad_accum must be 1 (got {train.grad_accum}); raise "
                "train.batch_size instead"
            )
        if train.clip_grad_norm is not None:
            problems.append(
                "optimizer.fused_back_pass = true steps each parameter before the others' gradients exist, so the "
                "global norm for train.clip_grad_norm is never known: unset train.clip_grad_norm or fused_back_pass"
            )
        if train.mixed_precision == "fp16":
            problems.append(
                "optimizer.fused_back_pass = true cannot run under fp16 loss scaling (the scaler must see every "
                "gradient before a step); use train.mixed_precision = 'bf16' or 'no'"
            )
        if not spec.per_param_state:
            fusable = ", ".join(n for n, s in OPTIMIZERS.items() if s.per_param_state)
            problems.append(
                f"optimizer.fused_back_pass = true: {spec.name} keeps state across parameters (step counters or a "
                f"global step-size estimate), so per-parameter steps would change it. Available with: {fusable}"
            )
    return problems


def check_scheduler_config(config: Config) -> list[str]:
    train = config.train
    name = train.lr_scheduler
    if name not in SCHEDULES:
        return [f"train.lr_scheduler = {name!r}: unknown schedule; valid: {', '.join(SCHEDULES)}"]
    problems = []
    if train.lr_warmup_ratio is not None and train.lr_warmup_steps:
        problems.append(
            f"train.lr_warmup_ratio = {train.lr_warmup_ratio} and train.lr_warmup_steps = {train.lr_warmup_steps}: "
            "set one of them"
        )
    if train.lr_min >= train.lr:
        problems.append(f"train.lr_min = {train.lr_min!r}: must be below train.lr = {train.lr!r}")
    if name == "cyclic" and (train.lr_warmup_steps or train.lr_warmup_ratio):
        problems.append(
            "train.lr_scheduler = 'cyclic' rises from lr_min to lr in every cycle; it takes no warmup "
            "(unset train.lr_warmup_steps / lr_warmup_ratio)"
        )
    if name == "adafactor":
        spec_name = canonical_name(config.optimizer.name)
        if spec_name != "adafactor" or not OPTIMIZERS["adafactor"].lr_ignored(optimizer_kwargs(config)):
            problems.append(
                "train.lr_scheduler = 'adafactor' reports the LR adaptive Adafactor computes itself; it needs "
                "optimizer.name = 'adafactor' with relative_step = true (the default). Pick another schedule "
                "for a fixed LR"
            )
    return problems


# ---------------------------------------------------------------------------------------- builds
def build_optimizer(config: Config, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """Each group carries its own `lr` (UNet vs text encoder); hooks for stochastic rounding and the
    fused backward pass are attached here, so every caller gets the configured behaviour."""
    spec = get_spec(config.optimizer.name)
    lrs = {g["lr"] for g in param_groups if g["lr"]}
    if spec.equal_group_lr and len(lrs) > 1:
        from difftune.errors import ConfigError

        raise ConfigError(
            f"optimizer {spec.name} needs the same lr in every parameter group, got "
            f"{ {g.get('name', i): g['lr'] for i, g in enumerate(param_groups)} }"
        )
    default_lr = param_groups[0]["lr"] if param_groups else config.train.lr
    optimizer = instantiate(spec, param_groups, optimizer_kwargs(config), default_lr)
    if config.optimizer.stochastic_rounding:
        from difftune.optim.hooks import attach_stochastic_rounding

        attach_stochastic_rounding(optimizer)
    if config.optimizer.fused_back_pass:
        from difftune.optim.hooks import FusedBackPass

        optimizer.fused_back_pass = FusedBackPass(optimizer)  # kept alive with the optimizer
    return optimizer


def lr_multiplier(config: Config, total_steps: int) -> ScheduleFn:
    """Multiplier of each group's base LR at the 0-based optimizer step, warmup included."""
    return multiplier_fn(config.train.lr_scheduler, params_from_config(config, total_steps))


def build_scheduler(
    config: Config, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if config.train.lr_scheduler == "adafactor":
        from difftune.optim.adafactor_lr import AdafactorLR

        return AdafactorLR(optimizer)
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config, total_steps))
