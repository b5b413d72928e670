"""Optimizer and LR-schedule registries: small name → factory maps.

`check_*` functions validate names and settings at config load (before any model loads);
`build_*` functions construct the objects for training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from difftune.config.schema import Config

OptimizerFactory = Callable[..., torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptimizerFactory] = {
    "adamw": torch.optim.AdamW,
}


def optimizer_kwargs(config: Config) -> dict[str, Any]:
    """Settings passed to the optimizer factory."""
    opt = config.optimizer
    return {"betas": tuple(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay}


def check_optimizer_config(config: Config) -> list[str]:
    name = config.optimizer.name
    if name not in OPTIMIZERS:
        return [f"optimizer.name = {name!r}: unknown optimizer; valid: {', '.join(sorted(OPTIMIZERS))}"]
    return []


def build_optimizer(config: Config, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """Each group carries its own `lr` (UNet vs text encoder)."""
    return OPTIMIZERS[config.optimizer.name](param_groups, **optimizer_kwargs(config))


# An LR schedule is a multiplier of each group's base LR as a function of the optimizer step.
ScheduleFn = Callable[[int], float]


def _constant(total: int, warmup: int) -> ScheduleFn:
    return lambda step: 1.0


def _linear(total: int, warmup: int) -> ScheduleFn:
    span = max(1, total - warmup)
    return lambda step: max(0.0, 1.0 - (step - warmup) / span)


def _cosine(total: int, warmup: int) -> ScheduleFn:
    span = max(1, total - warmup)
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


SCHEDULES: dict[str, Callable[[int, int], ScheduleFn]] = {
    "constant": _constant,
    "linear": _linear,
    "cosine": _cosine,
}


def check_scheduler_config(config: Config) -> list[str]:
    name = config.train.lr_scheduler
    if name not in SCHEDULES:
        return [f"train.lr_scheduler = {name!r}: unknown schedule; valid: {', '.join(sorted(SCHEDULES))}"]
    return []


def lr_multiplier(config: Config, total_steps: int) -> ScheduleFn:
    """Multiplier at optimizer step `step` (0-based), warmup included."""
    warmup = config.train.lr_warmup_steps
    body = SCHEDULES[config.train.lr_scheduler](total_steps, warmup)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return body(step)

    return fn


def build_scheduler(
    config: Config, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config, total_steps))
