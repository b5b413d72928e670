"""PNG plots of the tuners' results: the LR sweep (loss against LR, bounds and recommendation marked)
and the step search (validation loss against step, best step and band marked)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from difftune.reporting.plots import save_figure  # noqa: E402


def plot_lr_sweep(result: dict[str, Any], path: Path) -> Path:
    """Score (bucket-normalised probe loss, 1 = before training) against LR on a log axis."""
    curve = result["curve"]
    lrs = [row["lr"] for row in curve]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    finite = [(lr, row["score"]) for lr, row in zip(lrs, curve, strict=True)
              if row.get("score") is not None and math.isfinite(row["score"])]
    if finite:
        ax.plot(*zip(*finite, strict=True), "o", color="tab:blue", alpha=0.45, markersize=4, label="probe score")
    smooth = [(lr, row["smoothed"]) for lr, row in zip(lrs, curve, strict=True) if row.get("smoothed") is not None]
    if smooth:
        ax.plot(*zip(*smooth, strict=True), "-", color="tab:blue", label="smoothed")
    band = result.get("lr_band")
    if band:
        ax.axvspan(band[0], band[2], color="tab:green", alpha=0.15, label="lr band 10-90%")
    for key, style, color in (("lr_min", "--", "tab:gray"), ("lr_max", "--", "tab:orange"), ("lr_edge", ":", "tab:red")):
        if result.get(key):
            ax.axvline(result[key], linestyle=style, color=color, linewidth=1, label=f"{key} {result[key]:.2g}")
    if result.get("lr"):
        ax.axvline(result["lr"], color="tab:green", linewidth=2, label=f"lr ({result['rule']}) {result['lr']:.2g}")
    ax.axhline(1.0, color="black", linewidth=0.5, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("probe loss / loss before training")
    ax.set_title(textwrap.fill(f"find-lr: {result.get('verdict', '')}", 110), fontsize=9)
    if lrs:
        ax.set_xlim(min(lrs) / 1.5, max(lrs) * 1.5)  # the swept range, even when no point is finite
    if not finite:
        ax.text(0.5, 0.5, "no finite probe loss at any point", transform=ax.transAxes, ha="center")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if finite:
        top = max(v for _, v in finite)
        ax.set_ylim(bottom=max(0.0, min(v for _, v in finite) - 0.05), top=min(top, 2.0) + 0.05)
    return save_figure(fig, path)


def plot_step_search(result: dict[str, Any], path: Path) -> Path:
    """Validation (and stabilized train) loss against step, with the best step and the step band."""
    curve = result["curve"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, color, label in (("val_loss", "tab:red", "validation loss"), ("stable_train_loss", "tab:green", "stabilized train loss")):
        points = [(row["step"], row[key]) for row in curve if row.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), "o-", color=color, markersize=3, label=label)
    band = result.get("step_band")
    if band:
        ax.axvspan(band[0], band[1], color="tab:green", alpha=0.15, label=f"within {100 * result['margin']:g}% of best")
    if result.get("best_step") is not None:
        ax.axvline(result["best_step"], color="tab:green", linewidth=2, label=f"best step {result['best_step']}")
    if result.get("stopped_at") is not None and result.get("early_stop"):
        ax.axvline(result["stopped_at"], color="tab:gray", linestyle=":", label=f"early stop @ {result['stopped_at']}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"find-steps at lr {result['lr']:.3g}: {result.get('verdict', '')}"[:110], fontsize=9)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    scores = [(row["step"], row["sample_digit_score"]) for row in curve if row.get("sample_digit_score") is not None]
    if scores:  # digit prompts: how many samples a digit classifier reads as the prompted digit
        right = ax.twinx()
        line, = right.plot(*zip(*scores, strict=True), "s--", color="tab:blue", markersize=3,
                           label="samples read as the prompted digit")
        right.set_ylim(-0.02, 1.02)
        right.set_ylabel("sample digit score")
        handles, labels = handles + [line], labels + [line.get_label()]
    ax.legend(handles, labels, fontsize=8)
    return save_figure(fig, path)
