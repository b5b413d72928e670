"""PNG plots of a run: losses (train, stabilized train, validation) and learning rate against step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write a figure as PNG (creating its folder) and free it: pyplot keeps every open figure alive."""
    from difftune.checkpoint.atomic import atomic_path

    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a viewer (or the web UI) never reads a half-written PNG
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path


def ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, current = [], None
    for v in values:
        current = v if current is None else (1 - alpha) * current + alpha * v
        out.append(current)
    return out


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_run(records: list[dict[str, Any]], plots_dir: Path, diverged_at: int | None = None) -> list[Path]:
    """Write loss.png and lr.png (a diverged run: marked at the step it diverged); returns the paths."""
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps, loss = series(records, "loss")
    if steps:
        ax.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss")
        ax.plot(steps, ema(loss), color="tab:blue", label="train loss (EMA)")
    ema_is_main = any("val_loss_raw" in r for r in records)  # ema.use_for = validation: val_loss is the EMA's
    for key, color, label in (
        ("stable_train_loss", "tab:green", "stabilized train loss"),
        ("val_loss", "tab:red", "validation loss" + (" (EMA weights)" if ema_is_main else "")),
        ("val_loss_raw", "tab:orange", "validation loss (training weights)"),
        ("val_loss_ema", "tab:purple", "validation loss (EMA weights)"),
    ):
        s, v = series(records, key)
        if s:
            ax.plot(s, v, "o-", color=color, markersize=3, label=label)
    _, val = series(records, "val_loss")
    if val:
        best = int(np.argmin(val))
        s, _ = series(records, "val_loss")
        ax.axvline(s[best], color="tab:red", linestyle=":", linewidth=1, label=f"best val @ {s[best]}")
    if diverged_at is not None:
        ax.axvline(diverged_at, color="black", linestyle="--", linewidth=1, label=f"diverged @ {diverged_at}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Loss" if diverged_at is None else f"Loss (diverged at step {diverged_at})")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(save_figure(fig, plots_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(8, 3.5))
    lr_keys = sorted({k for r in records for k in r if k == "lr" or k.startswith("lr/")})
    for key in lr_keys:
        s, v = series(records, key)
        ax.plot(s, v, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate")
    ax.grid(alpha=0.3)
    if lr_keys:
        ax.legend()
    written.append(save_figure(fig, plots_dir / "lr.png"))
    return written
