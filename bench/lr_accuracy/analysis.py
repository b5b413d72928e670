"""Score the LR finder against the brute-force grid: good band, regret, band coverage, cost."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

GOOD_TOLERANCE = 0.02
"""A grid LR is good when its best validation loss (mean over seeds) is within 2% of the grid's best."""


def grid_curve(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of the best validation loss at every grid LR (a diverged run counts as inf)."""
    lrs = sorted({r["lr"] for r in runs})
    per_lr = {lr: [r["best_val_loss"] for r in runs if r["lr"] == lr] for lr in lrs}
    means = [float(np.mean(per_lr[lr])) if all(math.isfinite(v) for v in per_lr[lr]) else math.inf for lr in lrs]
    best_i = int(np.argmin(means))
    best = means[best_i]
    good = [lr for lr, m in zip(lrs, means, strict=True) if m <= best * (1 + GOOD_TOLERANCE)]
    return {
        "lrs": lrs, "mean_best_val_loss": means, "per_seed": {str(lr): per_lr[lr] for lr in lrs},
        "best_lr": lrs[best_i], "best_loss": best, "good_lrs": good,
        "bracketed": 0 < best_i < len(lrs) - 1,
        "good_interval": good_interval(lrs, means, best),
        "seconds": float(sum(r["seconds"] for r in runs)),
        "steps": int(sum(r["steps"] for r in runs)),
    }


def interpolated_loss(lrs: list[float], means: list[float], lr: float) -> float | None:
    """Grid loss at `lr`, linear in log LR between grid points; None outside the grid."""
    x = np.log(lrs)
    if lr is None or not (x[0] <= math.log(lr) <= x[-1]):
        return None
    y = np.array(means, dtype=float)
    i = int(np.searchsorted(x, math.log(lr), side="right") - 1)
    i = min(i, len(x) - 2)
    if not (math.isfinite(y[i]) and math.isfinite(y[i + 1])):
        return math.inf
    t = (math.log(lr) - x[i]) / (x[i + 1] - x[i])
    return float(y[i] + t * (y[i + 1] - y[i]))


def good_interval(lrs: list[float], means: list[float], best: float) -> list[float]:
    """[low, high] LRs where the interpolated grid loss is within the tolerance (contiguous around the best)."""
    limit = best * (1 + GOOD_TOLERANCE)
    x = np.log(lrs)
    fine = np.linspace(x[0], x[-1], 2001)
    losses = np.array([interpolated_loss(lrs, means, math.exp(v)) for v in fine], dtype=float)
    ok = losses <= limit
    center = int(np.argmin(losses))
    lo = hi = center
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < len(fine) - 1 and ok[hi + 1]:
        hi += 1
    return [float(math.exp(fine[lo])), float(math.exp(fine[hi]))]


def score_lr(lr: float | None, grid: dict[str, Any]) -> dict[str, Any]:
    """Is `lr` in the good band, and its regret (interpolated grid loss vs the grid's best)."""
    if lr is None:
        return {"lr": None, "in_good_band": False, "regret": None, "note": "no recommendation"}
    lo, hi = grid["good_interval"]
    loss = interpolated_loss(grid["lrs"], grid["mean_best_val_loss"], lr)
    note = None
    if loss is None:
        note = "outside the grid"
    return {
        "lr": lr,
        "in_good_band": bool(lo <= lr <= hi),
        "regret": None if loss is None else (loss / grid["best_loss"] - 1.0 if math.isfinite(loss) else math.inf),
        "log10_distance_to_best": math.log10(lr / grid["best_lr"]),
        "note": note,
    }


def reanalyse_sweep(npz_path: Path, rule: str, smoothing: float, bootstrap: int, seed: int, stopped_early: bool):
    """Re-read a saved sweep with the current code's rules (the sweep itself does not depend on them)."""
    from difftune.tuning.curve import analyze_lr_sweep

    data = np.load(npz_path)
    return analyze_lr_sweep(
        data["lrs"], data["item_losses"], data["baseline"], data["buckets"], rule=rule, sigma=smoothing,
        bootstrap_samples=bootstrap, seed=seed, stopped_early=stopped_early,
    )


def plot_benchmark(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = results["problems"]
    fig, axes = plt.subplots(len(problems), 2, figsize=(13, 3.6 * len(problems)), squeeze=False)
    colors = {"default": "tab:green", "valley": "tab:purple", "steepest": "tab:orange", "midpoint": "tab:brown",
              "min_div10": "tab:gray"}
    for row, (name, p) in enumerate(problems.items()):
        ax = axes[row][0]
        grid = p["grid"]
        ax.plot(grid["lrs"], [m if math.isfinite(m) else np.nan for m in grid["mean_best_val_loss"]], "o-",
                color="black", label="grid: best val loss (mean of seeds)")
        for seed_values in zip(*[grid["per_seed"][str(lr)] for lr in grid["lrs"]], strict=True):
            ax.plot(grid["lrs"], [v if math.isfinite(v) else np.nan for v in seed_values], ".", color="gray", alpha=0.6)
        lo, hi = grid["good_interval"]
        ax.axvspan(lo, hi, color="tab:green", alpha=0.12, label="good band (within 2%)")
        sweep = p["sweeps"][0]
        for rule, score in sweep["rules"].items():
            if score["lr"]:
                ax.axvline(score["lr"], color=colors.get(rule, "tab:blue"), linewidth=2 if rule == "default" else 1,
                           linestyle="-" if rule == "default" else "--", label=f"{rule} {score['lr']:.2g}")
        band = sweep.get("lr_band")
        if band:
            ax.axvspan(band[0], band[2], ymax=0.08, color="tab:green", alpha=0.6, label="default band 10-90%")
        finite = [m for m in grid["mean_best_val_loss"] if math.isfinite(m)]
        ax.set_ylim(min(finite) * 0.95, min(finite) * 1.6)
        ax.set_xscale("log")
        ax.set_title(f"{name}: grid ({len(grid['lrs'])} LRs x seeds, {p['steps']} steps each)", fontsize=9)
        ax.set_xlabel("constant learning rate")
        ax.set_ylabel("best validation loss")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        ax = axes[row][1]
        for s in p["sweeps"]:
            curve = s["curve"]
            ax.plot([c["lr"] for c in curve], [c["score"] if c["score"] is not None else np.nan for c in curve], ".-",
                    label=f"{s['shape']} sweep, seed {s['seed']}", alpha=0.8)
        ax.axvspan(lo, hi, color="tab:green", alpha=0.12)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.3)
        ax.set_title(f"{name}: find-lr curves (score = probe loss / start)", fontsize=9)
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
