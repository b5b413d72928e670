"""Reading an LR range test, and a validation curve over steps. Pure numpy: no model, no torch.

An LR sweep trains the real setup while the learning rate rises, and after each point of the ramp
measures the deterministic probe (fixed items, fixed noise and timesteps). This module turns the
per-item probe losses into a decision:

1. **Score.** Diffusion losses differ by an order of magnitude between noise levels, so a plain mean is
   dominated by a few timesteps. Each timestep bucket's mean loss is divided by its value before
   training, and the buckets are averaged: the score starts at 1 and every noise level weighs the same.
2. **Smoothing and noise.** A Gaussian kernel over neighbouring points (centred, so no lag shifts the
   LRs to the right, unlike an EMA), and a noise level estimated from second differences (robust to
   the curve's own trend).
3. **Bounds.** `lr_min`: the first point clearly below the start (beyond the noise). `lr_max`: where
   the fall ends, i.e. the first point within the noise of the curve's minimum.
4. **Rules** pick a constant LR from the curve: `valley` (fastai), `steepest` (pytorch-lr-finder /
   Lightning), `midpoint` (the community's geometric midpoint of the bounds), `min_div10` (fastai's
   older minimum/10) and difftune's `default` (see `rule_default` and docs/tuning.md for the benchmark
   that chose it).
5. **Band.** A bootstrap over probe items (resample items, recompute the whole curve and the rule)
   gives the 10/50/90 % percentiles of the recommendation.
6. **Verdict** in plain words when the curve cannot be read.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from difftune.config.schema import FindLRConfig, FindStepsConfig

# Defaults are the config's (config/schema.py), so a direct call reads a curve as `difftune find-lr` does.
_FIND_LR = FindLRConfig.model_fields
_FIND_STEPS = FindStepsConfig.model_fields

# A change must exceed NOISE_SIGMAS noise levels, and at least MIN_DROP of the start, to count.
NOISE_SIGMAS = 3.0
MIN_DROP = 0.002
ONSET_FRACTION = 0.05
"""lr_min: where 5% of the curve's total fall is done."""
FLAT_FRACTION = 0.05
"""lr_max: where the curve is within 5% of its total fall of its minimum."""


# --------------------------------------------------------------------------------------------- score
def bucket_scores(
    item_losses: np.ndarray, baseline: np.ndarray, buckets: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Bucket-normalised score of every sweep point; with `weights` (B, items) one curve per row.

    Args:
        item_losses: (points, items) probe loss of each item after each sweep point.
        baseline: (items,) probe loss of each item before any training.
        buckets: (items,) timestep bucket of each item.
        weights: optional (B, items) item counts of bootstrap resamples.

    Returns:
        (points,) or (B, points): mean over buckets of bucket-mean / bucket-mean at the baseline.
        A point with a non-finite item loss scores +inf (it diverged).
    """
    losses = np.asarray(item_losses, dtype=float)
    base = np.asarray(baseline, dtype=float)
    buckets = np.asarray(buckets)
    single = weights is None
    w = np.ones((1, losses.shape[1])) if single else np.asarray(weights, dtype=float)
    finite = np.isfinite(losses).all(axis=1)
    safe = np.where(np.isfinite(losses), losses, 0.0)
    ratios, present = [], []
    for b in np.unique(buckets):
        idx = buckets == b
        wb = w[:, idx]
        count = wb.sum(axis=1)  # (B,)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_points = (wb @ safe[:, idx].T) / count[:, None]  # (B, points)
            mean_base = (wb @ base[idx]) / count  # (B,)
            ratios.append(mean_points / mean_base[:, None])
        present.append(count > 0)
    ratios_arr = np.stack(ratios)  # (buckets, B, points)
    present_arr = np.stack(present)[:, :, None]  # a resample may miss a bucket entirely
    score = np.where(present_arr, ratios_arr, 0.0).sum(axis=0) / present_arr.sum(axis=0)
    score[:, ~finite] = np.inf
    return score[0] if single else score


def smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """Centred Gaussian smoothing over point indices, renormalised at the edges (no padding bias).

    Non-finite values are left out of their neighbours' averages and stay non-finite themselves.
    """
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    if sigma <= 0 or values.size < 3:
        return values.copy()
    radius = max(1, int(math.ceil(3 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    padded_v = np.pad(np.where(finite, values, 0.0), radius)
    padded_w = np.pad(finite.astype(float), radius)
    num = np.convolve(padded_v, kernel, mode="valid")
    den = np.convolve(padded_w, kernel, mode="valid")
    out = np.where(den > 0, num / np.maximum(den, 1e-300), np.nan)
    out[~finite] = values[~finite]
    return out


def noise_level(values: np.ndarray) -> float:
    """Point-to-point noise (one standard deviation) from the median absolute second difference.

    Second differences cancel a locally linear trend, so the estimate does not grow with the curve's
    slope; for white noise Var(x[i-1] - 2 x[i] + x[i+1]) = 6 sigma^2, and 1.4826 * MAD estimates sigma.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 4:
        return 0.0
    d2 = v[:-2] - 2 * v[1:-1] + v[2:]
    return float(1.4826 * np.median(np.abs(d2)) / math.sqrt(6.0))


# ------------------------------------------------------------------------------------- features
@dataclass
class CurveFeatures:
    """What the rules read off one score curve."""

    lrs: np.ndarray
    score: np.ndarray
    smoothed: np.ndarray
    """Smoothed score of the readable points (those before the first diverged one)."""
    noise: float
    usable: int
    """Number of leading readable points: finite and not yet diverged (climbed back above the start)."""
    fall: float
    """1 - smoothed minimum: how far the loss fell at best (0 when it never fell)."""
    onset: int | None
    """Index of the first point clearly below the start, or None."""
    lr_onset: float | None
    """lr_min: the LR where the smoothed curve crosses the onset level (log-interpolated between points)."""
    min_index: int | None
    """Index of the smoothed minimum among the readable points."""
    flat: int | None
    """Index of the first point (after the onset) where the fall is over: within the flat level of the minimum."""
    lr_flat: float | None
    """lr_max: the LR where the smoothed curve reaches the flat level (log-interpolated)."""
    rose_after: bool
    """The curve climbs clearly above its minimum after it, or diverged (NaN/inf, back above the start)."""
    edge: int | None = None
    """Index of the first point after the minimum that diverged (see `_edge_index`): the LR is now too
    high for training to keep its progress. None: it never happened within the sweep."""

    @property
    def lr_edge(self) -> float | None:
        """The stability edge: geometric middle of the last point before `edge` and `edge` itself (it lies
        somewhere in that bracket; the sweep cannot say where)."""
        if self.edge is None or self.edge == 0:
            return None
        return float(math.sqrt(self.lrs[self.edge - 1] * self.lrs[self.edge]))

    @property
    def log_lrs(self) -> np.ndarray:
        return np.log(self.lrs)

    @property
    def lr_at_min(self) -> float | None:
        return None if self.min_index is None else float(self.lrs[self.min_index])


def _crossing(lrs: np.ndarray, s: np.ndarray, i: int, level: float) -> float:
    """The LR where the falling curve `s` crosses `level` between points i-1 and i, linear in log LR."""
    if i == 0 or s[i - 1] <= s[i]:
        return float(lrs[i])
    t = float(np.clip((s[i - 1] - level) / (s[i - 1] - s[i]), 0.0, 1.0))
    return float(math.exp(math.log(lrs[i - 1]) + t * (math.log(lrs[i]) - math.log(lrs[i - 1]))))


def readable_points(score: np.ndarray, noise: float) -> int:
    """Leading points before the curve diverged: a non-finite score, or, after it fell, a point back
    above the start. Diverged points are not smoothed with their neighbours: one blown-up point would
    otherwise drag the smoothed minimum up and to the left."""
    finite = np.isfinite(score)
    end = int(np.flatnonzero(~finite)[0]) if (~finite).any() else score.size
    if end == 0:
        return 0
    best = int(np.argmin(score[:end]))
    margin = max(NOISE_SIGMAS * noise, MIN_DROP)
    if score[best] < 1.0 - margin:
        above = np.flatnonzero(score[best:end] > 1.0 + margin)
        if above.size:
            end = best + int(above[0])
    return end


def curve_features(lrs: np.ndarray, score: np.ndarray, sigma: float = 1.0) -> CurveFeatures:
    """Smooth a score curve and locate its onset (lr_min), end of fall (lr_max) and minimum.

    Levels are relative to the curve's own fall, with the noise as a floor: the onset is where
    ONSET_FRACTION of the fall is done, the flat part starts where all but FLAT_FRACTION of it is done.
    Both are scale-free, so a fine-tune whose loss moves by 2% reads like a run from scratch whose
    loss moves by 90%.
    """
    lrs = np.asarray(lrs, dtype=float)
    score = np.asarray(score, dtype=float)
    finite = score[np.isfinite(score)]
    noise = noise_level(finite)  # a median: the few points of a blow-up do not move it
    usable = readable_points(score, noise)
    s = smooth(score[:usable], sigma) if usable else np.array([])
    fall = float(max(0.0, 1.0 - s.min())) if usable else 0.0
    floor = max(NOISE_SIGMAS * noise, MIN_DROP)
    onset = lr_onset = min_index = flat = lr_flat = None
    rose_after = usable < score.size
    if usable:
        min_index = int(np.argmin(s))
        if fall > floor:
            level = 1.0 - max(floor, ONSET_FRACTION * fall)
            # The raw point must agree, so one smoothed-in outlier does not make an onset.
            below = [i for i in np.flatnonzero(s < level) if score[i] < level]
            if below:
                onset = int(below[0])
                lr_onset = _crossing(lrs, s, onset, level)
        if onset is not None and min_index >= onset:
            level = s[min_index] + max(floor, FLAT_FRACTION * fall)
            flat = onset + int(np.flatnonzero(s[onset : min_index + 1] <= level)[0])
            # a fall barely above the noise has its flat level above the onset's: it cannot end before it starts
            lr_flat = max(_crossing(lrs, s, flat, level), lr_onset)
        if min_index < usable - 1 and np.max(s[min_index:]) > s[min_index] + floor:
            rose_after = True
    edge = _edge_index(score, s, min_index, floor) if onset is not None else None
    return CurveFeatures(
        lrs[: score.size], score, s, noise, usable, fall, onset, lr_onset, min_index, flat, lr_flat, rose_after, edge
    )


EDGE_FACTOR = 4.0
"""A point above this multiple of the minimum (the sweep's default stop rule) is past the edge too."""


def _edge_index(score: np.ndarray, s: np.ndarray, min_index: int | None, floor: float) -> int | None:
    """First raw point after the smoothed minimum that is non-finite, back above the start, or above
    EDGE_FACTOR times the minimum: training at that LR destroys what it built."""
    if min_index is None:
        return None
    level = min(1.0 + floor, EDGE_FACTOR * float(s[min_index]))
    for i in range(min_index + 1, score.size):
        if not math.isfinite(score[i]) or score[i] > level:
            return i
    return None


# ------------------------------------------------------------------------------------------ rules
Rule = Callable[[CurveFeatures], float | None]


def rule_valley(f: CurveFeatures) -> float | None:
    """fastai's `valley`: the middle of the longest decreasing run (not necessarily contiguous) of the
    smoothed curve, in point index (= log LR for a log sweep)."""
    s = f.smoothed
    n = len(s)
    if n < 2:
        return None
    length = np.ones(n, dtype=int)
    best_end = 0
    for i in range(1, n):
        earlier = np.flatnonzero(s[:i] > s[i])
        if earlier.size:
            length[i] = 1 + int(length[earlier].max())
        if length[i] > length[best_end]:
            best_end = i
    if length[best_end] < 2:
        return None
    start = best_end - int(length[best_end])
    return float(f.lrs[max(0, start + (best_end - start) // 2)])


def rule_steepest(f: CurveFeatures) -> float | None:
    """pytorch-lr-finder / Lightning: the steepest descent of the smoothed loss against log LR, searched
    before the minimum (after it the curve can only be climbing)."""
    if f.min_index is None or f.min_index < 1:
        return None
    end = f.min_index + 1
    grad = np.gradient(f.smoothed[:end], f.log_lrs[:end]) if end > 1 else np.zeros(1)
    return float(f.lrs[int(np.argmin(grad))])


def rule_min_div10(f: CurveFeatures) -> float | None:
    """fastai's older suggestion: a tenth of the LR at the loss minimum."""
    if f.min_index is None or f.onset is None:
        return None
    return float(f.lrs[f.min_index] / 10.0)


def rule_midpoint(f: CurveFeatures) -> float | None:
    """The community's reading: the geometric midpoint of where the loss starts and stops falling."""
    if f.lr_onset is None or f.lr_flat is None:
        return None
    return float(math.sqrt(f.lr_onset * f.lr_flat))


EDGE_DIVISOR = _FIND_LR["edge_divisor"].default
"""`rule_default` trains this factor below the stability edge (find_lr.edge_divisor): of 3.5/4/4.5/5, the
one whose check runs (real training at the recommended LR, 2 seeds) had the smallest worst regret on
bench/lr_accuracy's problems; 3.5 scores better against the grid but diverged there (docs/tuning.md)."""


def rule_default(f: CurveFeatures, divisor: float = EDGE_DIVISOR) -> float | None:
    """difftune's rule: a fixed factor below the stability edge, where the sweep's loss diverged.

    The edge is the sharpest feature of a sweep: it does not depend on how much there was to learn
    (which moves the minimum and the steepest point), and a fine-tune whose loss moves by 2% shows it as
    clearly as a run from scratch. The sweep holds each LR for only a few steps, so a constant LR for a
    whole run must sit well below it; bench/lr_accuracy measured the factor against brute-force grids.
    Without an edge (the loss never turned back within the range) the last point stands in for it,
    a lower bound, and the verdict says so.
    """
    if f.onset is None or f.min_index is None:
        return None
    edge = f.lr_edge if f.lr_edge is not None else float(f.lrs[f.usable - 1])
    return edge / divisor


def edge_bracket(f: CurveFeatures, divisor: float = EDGE_DIVISOR) -> tuple[float, float] | None:
    """`rule_default`'s LR if the edge were at either end of its bracket (the sweep's resolution)."""
    if f.edge is None or f.edge == 0:
        return None
    return float(f.lrs[f.edge - 1]) / divisor, float(f.lrs[f.edge]) / divisor


RULES: dict[str, Rule] = {
    "default": rule_default,
    "valley": rule_valley,
    "steepest": rule_steepest,
    "midpoint": rule_midpoint,
    "min_div10": rule_min_div10,
}


# ---------------------------------------------------------------------------------------- analysis
@dataclass
class LRAnalysis:
    """The reading of one sweep: bounds, recommendation, band, and whether the curve was usable."""

    rule: str
    lr: float | None
    lr_min: float | None
    lr_max: float | None
    lr_band: list[float] | None
    """10/50/90 % percentiles of the rule's LR over bootstrap resamples of the probe items."""
    status: str
    """"ok", "warning" (usable with a caveat) or "unusable"."""
    verdict: str
    suggestions: dict[str, float | None]
    """Every rule's LR on the same curve (for comparison)."""
    score: list[float]
    smoothed: list[float]
    noise: float
    lr_at_minimum: float | None
    lr_edge: float | None
    """Where the loss diverged (climbed back above the start or blew up): the upper limit of any LR."""
    bootstrap: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return json_safe(dict(self.__dict__))


def json_safe(value: Any) -> Any:
    """Nested data with NaN/inf replaced by None (strict JSON has neither) and numpy scalars as Python's."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(x) for x in value]
    if isinstance(value, dict):
        return {k: json_safe(x) for k, x in value.items()}
    return value


def _verdict(f: CurveFeatures, lrs: np.ndarray, stopped_early: bool) -> tuple[str, str]:
    """Status and plain-words verdict of a curve."""
    floor = max(NOISE_SIGMAS * f.noise, MIN_DROP)
    if f.usable == 0 or (f.onset is None and f.smoothed.size and f.smoothed[0] > 1.0 + floor):
        return "unusable", (
            f"the loss diverged at the first point (lr {lrs[0]:.3g}): lower find_lr.start_lr "
            "(or check train.mixed_precision / clip_grad_norm)"
        )
    if f.onset is None:
        raw = f.score[: f.usable]
        if raw.size and raw.min() < 1.0 - MIN_DROP and f.noise * NOISE_SIGMAS > MIN_DROP:
            return "unusable", (
                f"noisy plateau: the loss moved by less than its noise ({f.noise:.3g} per point) over "
                f"{lrs[0]:.3g}..{lrs[f.usable - 1]:.3g}: use more probe items (find_lr.probe_items), "
                "more steps per point, or a wider range"
            )
        return "unusable", (
            f"the loss never fell over {lrs[0]:.3g}..{lrs[f.usable - 1]:.3g}: raise the range "
            "(find_lr.end_lr) or the steps per point (find_lr.steps_per_point)"
        )
    if f.onset == 0:
        return "warning", (
            f"the loss was already falling at the first point (lr {lrs[0]:.3g}): lr_min may be lower; "
            "lower find_lr.start_lr to see where it starts"
        )
    if not f.rose_after and not stopped_early and f.min_index is not None and f.min_index >= f.usable - 2:
        return "warning", (
            f"the loss was still falling at the end of the range (lr {lrs[f.usable - 1]:.3g}): lr_max may be "
            "higher; raise find_lr.end_lr to see where it stops"
        )
    if f.edge is None:
        return "warning", (
            f"the loss never diverged up to lr {lrs[f.usable - 1]:.3g}: the recommendation takes that as the "
            "stability edge, so it may be low; raise find_lr.end_lr to find the real edge"
        )
    return "ok", "the loss fell, flattened and diverged: the bounds and the stability edge are clear"


def analyze_lr_sweep(
    lrs: Sequence[float],
    item_losses: np.ndarray,
    baseline: np.ndarray,
    buckets: np.ndarray,
    rule: str = "default",
    sigma: float = _FIND_LR["smoothing"].default,
    bootstrap_samples: int = _FIND_LR["bootstrap_samples"].default,
    seed: int = 0,
    stopped_early: bool = False,
    edge_divisor: float = EDGE_DIVISOR,
) -> LRAnalysis:
    """Read one LR sweep: bounds, every rule's suggestion, the chosen rule's LR and its bootstrap band.

    Args:
        lrs: LR of each sweep point (increasing).
        item_losses: (points, items) probe losses after each point; rows may stop early (divergence).
        baseline: (items,) probe losses before training.
        buckets: (items,) timestep bucket of each item.
        rule: a name in RULES.
        sigma: smoothing width in points.
        bootstrap_samples: resamples of the probe items for the band (0 disables it).
        seed: seed of the bootstrap.
        stopped_early: the sweep stopped on divergence before its last point.
        edge_divisor: the default rule's factor below the stability edge.
    """
    if rule not in RULES:
        raise ValueError(f"find_lr.rule = {rule!r}: unknown rule; valid: {', '.join(RULES)}")
    lrs_arr = np.asarray(lrs, dtype=float)
    losses = np.asarray(item_losses, dtype=float)
    if losses.ndim != 2 or losses.shape[0] != lrs_arr.size:
        raise ValueError(f"item_losses must be (points, items) with {lrs_arr.size} points, got {losses.shape}")
    score = bucket_scores(losses, baseline, buckets)
    f = curve_features(lrs_arr, score, sigma)
    status, verdict = _verdict(f, lrs_arr, stopped_early)
    rules = {**RULES, "default": functools.partial(rule_default, divisor=edge_divisor)}
    suggestions = {name: (fn(f) if status != "unusable" else None) for name, fn in rules.items()}
    lr = suggestions[rule]
    band, boot = None, {}
    if lr is not None and bootstrap_samples > 0:
        band, boot = _bootstrap_band(lrs_arr, losses, baseline, buckets, rules[rule], sigma, bootstrap_samples, seed)
        bracket = edge_bracket(f, edge_divisor) if rule == "default" else None
        if band is not None and bracket is not None:
            # Resampling probe items cannot move the edge off the sweep's points: where between two
            # points it lies is the larger uncertainty, so the band spans both.
            band = [min(band[0], bracket[0]), band[1], max(band[2], bracket[1])]
    return LRAnalysis(
        rule=rule,
        lr=lr,
        lr_min=f.lr_onset if status != "unusable" else None,
        lr_max=f.lr_flat if status != "unusable" else None,
        lr_band=band,
        status=status,
        verdict=verdict,
        suggestions=suggestions,
        score=[float(x) for x in score],
        smoothed=[float(x) for x in f.smoothed],
        noise=f.noise,
        lr_at_minimum=f.lr_at_min,
        lr_edge=f.lr_edge if status != "unusable" else None,
        bootstrap=boot,
    )


def _bootstrap_band(lrs, losses, baseline, buckets, rule_fn: Rule, sigma, samples, seed):
    """Resample probe items with replacement, re-read each curve with the same rule; 10/50/90 % of the LR."""
    rng = np.random.default_rng(seed)
    n = losses.shape[1]
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(samples)])
    curves = bucket_scores(losses, baseline, buckets, weights=counts)
    picks = []
    for curve in curves:
        value = rule_fn(curve_features(lrs, curve, sigma))
        if value is not None:
            picks.append(math.log(value))
    if not picks:
        return None, {"samples": samples, "readable": 0}
    p10, p50, p90 = np.percentile(picks, [10, 50, 90])
    return [float(math.exp(p10)), float(math.exp(p50)), float(math.exp(p90))], {
        "samples": samples,
        "readable": len(picks),
    }


def should_stop(scores: Sequence[float], stop_factor: float = _FIND_LR["stop_factor"].default) -> str | None:
    """Early stop of a sweep: the reason, or None to go on.

    Stops on a non-finite loss, on a loss above `stop_factor` times the best so far (fastai and
    pytorch-lr-finder use 4x and 5x), and once the loss climbs back above where it started after having
    fallen (every later point is past lr_max and only costs time).
    """
    if not scores:
        return None
    last = scores[-1]
    if not math.isfinite(last):
        return f"the loss became {last}"
    best = min(s for s in scores if math.isfinite(s))
    if last > stop_factor * best:
        return f"the loss rose above {stop_factor:g}x its best"
    if best < 1.0 - MIN_DROP and last > 1.0 + MIN_DROP:
        return "the loss climbed back above its starting value"
    return None


# ------------------------------------------------------------------------------------- step curves
@dataclass
class StepAnalysis:
    """Where a validation curve over steps bottoms out."""

    best_step: int | None
    best_loss: float | None
    step_band: list[int] | None
    """[first, last] validated step whose loss is within `margin` of the minimum."""
    earliest_good_step: int | None
    """The first step within the margin: the cheapest run that is as good."""
    margin: float
    status: str
    verdict: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def analyze_steps(steps: Sequence[int], losses: Sequence[float],
                  margin: float = _FIND_STEPS["margin"].default) -> StepAnalysis:
    """Best step and the band of steps within a relative `margin` of the lowest validation loss."""
    pairs = [(int(s), float(v)) for s, v in zip(steps, losses, strict=True) if v is not None and math.isfinite(v)]
    if not pairs:
        return StepAnalysis(None, None, None, None, margin, "unusable", "no finite validation loss was measured")
    best_step, best_loss = min(pairs, key=lambda p: p[1])
    good = [s for s, v in pairs if v <= best_loss * (1.0 + margin)]
    status, verdict = "ok", f"validation loss bottomed out at step {best_step}"
    if best_step == pairs[0][0]:
        status, verdict = "warning", "validation loss never improved on the untrained model: lower the LR"
    elif best_step == pairs[-1][0]:
        status, verdict = "warning", (
            f"validation loss was still falling at the last step ({best_step}): more steps may help "
            "(raise find_steps.max_steps)"
        )
    return StepAnalysis(best_step, best_loss, [min(good), max(good)], min(good), margin, status, verdict)


class EarlyStopping:
    """Stop a run when its validation loss has clearly stopped improving.

    Two criteria, either of which stops (set one to None to disable it):

    - **patience** (the default, 8): `patience` validations in a row without a new best (by more than
      `min_delta`, relative) — the common rule of Keras/Lightning.
    - **generalization loss** GL_alpha (Prechelt 1998, "Early stopping — but when?"), off by default:
      GL(t) = 100 * (E_val(t) / E_best(t) - 1), the percentage by which the current validation loss
      exceeds the best so far; stop when GL(t) > alpha at `gl_consecutive` validations in a row. Diffusion
      validation curves at a constant LR have bumps of 5-50% while still falling (an early spike of +74%
      on digits at a high LR, then a 10x lower minimum): replayed on 255 measured curves
      (bench/stopping_rules.py) GL5 kept a checkpoint more than 2% worse than the run's minimum on 136,
      patience 8 alone on 12.
    A non-finite loss stops at once.
    """

    def __init__(self, patience: int | None = _FIND_STEPS["patience"].default, gl_alpha: float | None = None,
                 min_delta: float = _FIND_STEPS["min_delta"].default,
                 gl_consecutive: int = _FIND_STEPS["gl_consecutive"].default):
        if patience is None and gl_alpha is None:
            raise ValueError("EarlyStopping needs patience or gl_alpha")
        if gl_consecutive < 1:
            raise ValueError(f"gl_consecutive must be >= 1, got {gl_consecutive}")
        self.patience = patience
        self.gl_alpha = gl_alpha
        self.gl_consecutive = gl_consecutive
        self.min_delta = min_delta
        self.best_loss: float | None = None
        self.best_step: int | None = None
        self.bad_evaluations = 0
        self.evaluations_above_gl = 0
        self.reason: str | None = None

    def generalization_loss(self, loss: float) -> float:
        """Prechelt's GL in percent relative to the best loss so far."""
        if self.best_loss is None or self.best_loss <= 0:
            return 0.0
        return 100.0 * (loss / self.best_loss - 1.0)

    def update(self, step: int, loss: float) -> bool:
        """Record one validation; True means stop now (`reason` says why)."""
        if not math.isfinite(loss):
            self.reason = f"validation loss became {loss} at step {step}"
            return True
        if self.best_loss is None or loss < self.best_loss * (1.0 - self.min_delta):
            self.best_loss, self.best_step, self.bad_evaluations = loss, step, 0
            self.evaluations_above_gl = 0
            return False
        self.bad_evaluations += 1
        gl = self.generalization_loss(loss)
        above = self.gl_alpha is not None and gl > self.gl_alpha
        self.evaluations_above_gl = self.evaluations_above_gl + 1 if above else 0
        if above and self.evaluations_above_gl >= self.gl_consecutive:
            in_a_row = f", {self.evaluations_above_gl} validations in a row" if self.gl_consecutive > 1 else ""
            self.reason = (
                f"generalization loss GL = {gl:.1f}% > {self.gl_alpha:g}% at step {step}{in_a_row} "
                f"(validation loss {loss:.5g} vs best {self.best_loss:.5g} at step {self.best_step})"
            )
            return True
        if self.patience is not None and self.bad_evaluations >= self.patience:
            self.reason = (
                f"no new best validation loss for {self.bad_evaluations} validations (patience {self.patience}); "
                f"best {self.best_loss:.5g} at step {self.best_step}"
            )
            return True
        return False
