"""LR schedules as pure functions: multiplier(step) of each group's base LR.

`step` is the 0-based optimizer step whose update uses the LR (LambdaLR's convention: multiplier(0)
is the LR of the first update). Every schedule is one small formula, so it is tested against that
formula, and the ones diffusers also has (`constant`, `constant_with_warmup`, `linear`, `cosine`,
`cosine_with_restarts`, `polynomial`) match diffusers' `get_scheduler` step for step, which is what
EveryDream2 and kohya run. Warmup is diffusers' linear ramp `step / warmup` (the first update has LR
0) and applies to every schedule except `one_cycle` (its rise is the warmup) and `cyclic`.

`decay_end` is `train.lr_decay_steps` (default: the run length). As in EveryDream2 (which passes
lr_decay_steps to diffusers as num_training_steps), `cosine` keeps following its curve past
decay_end, so with lr_decay_steps shorter than the run the LR climbs back up towards lr; the other
decaying schedules hold their final value.

`floor` is train.lr_min / train.lr: the LR decays towards lr_min instead of 0, and every group keeps
the same ratio (the text encoder decays to text_encoder_lr × lr_min / lr).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

ScheduleFn = Callable[[int], float]


@dataclass(frozen=True)
class ScheduleParams:
    total: int  # optimizer steps in the run
    warmup: int  # warmup steps (resolved from lr_warmup_steps or lr_warmup_ratio)
    decay_end: int  # step at which decay ends (lr_decay_steps, default total)
    floor: float = 0.0  # lr_min / lr
    cycles: int = 1  # lr_cycles
    power: float = 1.0  # lr_power
    gamma: float | None = None  # lr_gamma
    cycle_steps: int | None = None  # cycle_steps (cyclic)
    cyclic_mode: str = "triangular"
    wsd_decay_ratio: float = 0.1

    @property
    def span(self) -> int:
        """Steps from the end of warmup to the end of decay (at least 1)."""
        return max(1, self.decay_end - self.warmup)

    def progress(self, step: int) -> float:
        """0 at the end of warmup, 1 at decay_end; not clamped."""
        return (step - self.warmup) / self.span

    def lift(self, value: float) -> float:
        """Map a 0..1 shape onto floor..1."""
        return self.floor + (1.0 - self.floor) * value


def resolve_warmup(train, total_steps: int) -> int:
    """lr_warmup_steps, or lr_warmup_ratio × total steps (rounded down, as kohya does)."""
    if train.lr_warmup_ratio is not None:
        return int(train.lr_warmup_ratio * total_steps)
    return train.lr_warmup_steps


def params_from_config(config, total_steps: int) -> ScheduleParams:
    train = config.train
    return ScheduleParams(
        total=total_steps,
        warmup=resolve_warmup(train, total_steps),
        decay_end=train.lr_decay_steps or total_steps,
        floor=train.lr_min / train.lr,
        cycles=train.lr_cycles,
        power=train.lr_power,
        gamma=train.lr_gamma,
        cycle_steps=train.cycle_steps,
        cyclic_mode=train.cyclic_mode,
        wsd_decay_ratio=train.wsd_decay_ratio,
    )


# --------------------------------------------------------------------------------- the formulas
def constant(step: int, p: ScheduleParams) -> float:
    return 1.0


def linear(step: int, p: ScheduleParams) -> float:
    return p.lift(max(0.0, (p.decay_end - step) / p.span))


def cosine(step: int, p: ScheduleParams) -> float:
    # Unclamped progress on purpose: past decay_end the cosine rises again (EveryDream2 behaviour).
    return p.lift(0.5 * (1.0 + math.cos(math.pi * p.progress(step))))


def cosine_with_restarts(step: int, p: ScheduleParams) -> float:
    progress = p.progress(step)
    if progress >= 1.0:
        return p.floor
    return p.lift(0.5 * (1.0 + math.cos(math.pi * ((p.cycles * progress) % 1.0))))


def polynomial(step: int, p: ScheduleParams) -> float:
    if step >= p.decay_end:
        return p.floor
    return p.lift((1.0 - p.progress(step)) ** p.power)


def rex(step: int, p: ScheduleParams) -> float:
    # REX (Chen et al. 2021) with d = 0.9 as OneTrainer and sd-scripts use it.
    if step >= p.decay_end:
        return p.floor
    remaining = 1.0 - p.progress(step)
    return p.lift(remaining / (0.1 + 0.9 * remaining))


def exponential_gamma(p: ScheduleParams) -> float:
    """lr_gamma, or the per-step factor that reaches lr_min (1% of lr when lr_min = 0) at decay_end."""
    if p.gamma is not None:
        return p.gamma
    target = p.floor if p.floor > 0 else 0.01
    return target ** (1.0 / p.span)


def exponential(step: int, p: ScheduleParams) -> float:
    return max(p.floor, exponential_gamma(p) ** max(0, step - p.warmup))


def one_cycle_rise(p: ScheduleParams) -> int:
    """one_cycle's rise: the warmup, or 30% of decay_end (torch OneCycleLR's pct_start) without one."""
    return p.warmup if p.warmup > 0 else max(1, int(0.3 * p.decay_end))


def one_cycle(step: int, p: ScheduleParams) -> float:
    rise = one_cycle_rise(p)
    if step < rise:
        return p.lift(0.5 * (1.0 - math.cos(math.pi * step / rise)))
    if step >= p.decay_end:
        return p.floor
    return p.lift(0.5 * (1.0 + math.cos(math.pi * (step - rise) / max(1, p.decay_end - rise))))


def cycle_length(p: ScheduleParams) -> int:
    """cycle_steps, or the decay span split into lr_cycles cycles."""
    return p.cycle_steps or max(2, p.span // p.cycles)


def cyclic(step: int, p: ScheduleParams) -> float:
    # torch CyclicLR between lr_min and lr: half a cycle up, half down.
    length = cycle_length(p)
    cycle = math.floor(1 + step / length)
    height = max(0.0, 1.0 - abs(2 * step / length - 2 * cycle + 1))
    if p.cyclic_mode == "triangular2":
        height /= 2 ** (cycle - 1)
    elif p.cyclic_mode == "exp_range":
        height *= exponential_gamma(p) ** step
    return p.lift(height)


def warmup_stable_decay(step: int, p: ScheduleParams) -> float:
    decay = max(1, round(p.wsd_decay_ratio * p.span))
    start = p.decay_end - decay
    if step < start:
        return 1.0
    if step >= p.decay_end:
        return p.floor
    return p.lift(0.5 * (1.0 + math.cos(math.pi * (step - start) / decay)))


def adafactor_relative_step(step: int, warmup_init: bool = False) -> float:
    """Adafactor's internal relative step size at optimizer step `step` (0-based), before the RMS scale."""
    t = step + 1
    return min(1e-6 * t if warmup_init else 1e-2, 1.0 / math.sqrt(t))


@dataclass(frozen=True)
class Schedule:
    fn: Callable[[int, ScheduleParams], float]
    keys: tuple[str, ...]  # train.* keys that shape it (besides lr, lr_warmup_*)
    formula: str
    own_warmup: bool = False  # the schedule has its own rise: no linear warmup in front


SCHEDULES: dict[str, Schedule] = {
    "constant": Schedule(constant, (), "1"),
    "constant_with_warmup": Schedule(constant, (), "1 (after warmup)"),
    "linear": Schedule(linear, ("lr_decay_steps", "lr_min"), "max(0, (D - s) / (D - W))"),
    "cosine": Schedule(cosine, ("lr_decay_steps", "lr_min"),
                       "0.5 (1 + cos(pi (s - W) / (D - W))); keeps going past D (climbs back)"),
    "cosine_with_restarts": Schedule(cosine_with_restarts, ("lr_decay_steps", "lr_min", "lr_cycles"),
                                     "0.5 (1 + cos(pi ((C p) mod 1))), p = (s - W) / (D - W); 0 after D"),
    "polynomial": Schedule(polynomial, ("lr_decay_steps", "lr_min", "lr_power"), "(1 - p)^P"),
    "rex": Schedule(rex, ("lr_decay_steps", "lr_min"), "(1 - p) / (0.1 + 0.9 (1 - p))"),
    "exponential": Schedule(exponential, ("lr_decay_steps", "lr_min", "lr_gamma"),
                            "g^(s - W), g = lr_gamma or floor^(1/(D - W)); floor = lr_min/lr or 0.01"),
    "one_cycle": Schedule(one_cycle, ("lr_decay_steps", "lr_min"),
                          "cosine rise over R = W (or 0.3 D), cosine decay R..D", own_warmup=True),
    "cyclic": Schedule(cyclic, ("lr_min", "cycle_steps", "lr_cycles", "cyclic_mode", "lr_gamma"),
                       "triangle of length L between lr_min and lr; triangular2 halves it each cycle, "
                       "exp_range multiplies it by g^s", own_warmup=True),
    "warmup_stable_decay": Schedule(warmup_stable_decay, ("lr_decay_steps", "lr_min", "wsd_decay_ratio"),
                                    "1 until the last wsd_decay_ratio of W..D, then cosine to lr_min"),
    "adafactor": Schedule(constant, (), "Adafactor's internal LR (reported, not set)"),
}


def multiplier_fn(name: str, p: ScheduleParams) -> ScheduleFn:
    """The full schedule (warmup included) as a function of the 0-based optimizer step."""
    schedule = SCHEDULES[name]

    def fn(step: int) -> float:
        if p.warmup > 0 and step < p.warmup and not schedule.own_warmup:
            return step / p.warmup
        return schedule.fn(step, p)

    return fn
