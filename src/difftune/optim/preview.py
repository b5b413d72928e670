"""`difftune schedule`: the LR of every parameter group over the whole run, as a PNG and a table,
computed from the config alone (no model is loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftune.optim.optimizers import canonical_name, lr_ignored, optimizer_kwargs
from difftune.optim.registry import lr_multiplier
from difftune.optim.scaling import effective_lrs
from difftune.optim.schedules import SCHEDULES, adafactor_relative_step, resolve_warmup

if TYPE_CHECKING:
    from difftune.config.schema import Config


def group_base_lrs(config: Config) -> dict[str, float]:
    """The parameter groups training will have, with their base LRs after scale_lr."""
    from difftune.models.registry import trained_roles

    lrs = effective_lrs(config.train)
    return {role: lrs[role] for role in trained_roles(config)}


def schedule_curves(config: Config, total_steps: int) -> dict[str, list[float]]:
    """LR used by each optimizer step 1..total_steps, per group."""
    if config.train.lr_scheduler == "adafactor":
        warmup_init = bool(optimizer_kwargs(config).get("warmup_init", False))
        relative = [adafactor_relative_step(s, warmup_init) for s in range(total_steps)]
        return {"relative step size": relative}
    fn = lr_multiplier(config, total_steps)
    multipliers = [fn(s) for s in range(total_steps)]
    return {name: [lr * m for m in multipliers] for name, lr in group_base_lrs(config).items()}


def schedule_table(config: Config, total_steps: int) -> dict[str, Any]:
    curves = schedule_curves(config, total_steps)
    train = config.train
    warmup = resolve_warmup(train, total_steps)
    table: dict[str, Any] = {
        "scheduler": train.lr_scheduler,
        "optimizer": config.optimizer.name,
        "total_steps": total_steps,
        "warmup_steps": warmup,
        "warmup_end_step": warmup,
        # Only for schedules that decay towards a step (not constant, cyclic, adafactor).
        "decay_end_step": (train.lr_decay_steps or total_steps)
        if "lr_decay_steps" in SCHEDULES[train.lr_scheduler].keys else None,
        "groups": {},
        "notes": [],
    }
    for name, lrs in curves.items():
        peak = max(lrs) if lrs else 0.0
        table["groups"][name] = {
            "peak_lr": peak,
            "peak_step": (lrs.index(peak) + 1) if lrs else 0,
            "first_lr": lrs[0] if lrs else 0.0,
            "final_lr": lrs[-1] if lrs else 0.0,
            "min_lr_after_peak": min(lrs[lrs.index(peak):]) if lrs else 0.0,
        }
    if train.lr_scheduler == "adafactor" or (canonical_name(config.optimizer.name) and lr_ignored(config)):
        table["notes"].append(
            "adaptive Adafactor computes its LR inside the optimizer: relative step size min(1e-2, 1/sqrt(t)) "
            "(warmup_init: min(1e-6 t, 1/sqrt(t))), times each weight's RMS when scale_parameter = true; "
            "train.lr is not used"
        )
    spec_name = canonical_name(config.optimizer.name)
    if spec_name and spec_name.startswith(("dadapt", "prodigy")):
        table["notes"].append(f"{spec_name} estimates the step size d; the plotted lr multiplies it")
    if train.lr_scheduler == "cosine" and (train.lr_decay_steps or total_steps) < total_steps:
        table["notes"].append("cosine decay ends before the run does: the LR climbs back afterwards (EveryDream2)")
    return table


def write_schedule_preview(config: Config, out_png: str | Path, steps: int) -> dict[str, Any]:
    """Plot the LR per group for `steps` optimizer steps into `out_png`; returns the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difftune.reporting.plots import save_figure

    curves = schedule_curves(config, steps)
    table = schedule_table(config, steps)
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = list(range(1, steps + 1))
    for name, lrs in curves.items():
        ax.plot(xs, lrs, label=name)
    warmup = table["warmup_steps"]
    if warmup:
        ax.axvline(warmup, color="gray", linestyle=":", linewidth=1, label=f"warmup end ({warmup})")
    decay_end = table["decay_end_step"]
    if decay_end is not None and decay_end < steps:
        ax.axvline(decay_end, color="gray", linestyle="--", linewidth=1, label=f"decay end ({decay_end})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("relative step size" if config.train.lr_scheduler == "adafactor" else "learning rate")
    ax.set_title(f"{config.train.lr_scheduler} schedule, {config.optimizer.name}, {steps} steps")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out_png, dpi=100)
    return table


def format_schedule_table(table: dict[str, Any]) -> str:
    lines = [
        f"schedule      {table['scheduler']} ({table['optimizer']})",
        f"total steps   {table['total_steps']}",
        f"warmup end    step {table['warmup_end_step']}" if table["warmup_steps"] else "warmup        none",
        f"decay end     step {table['decay_end_step']}" if table["decay_end_step"] else "decay end     none",
        "",
        f"{'group':<20} {'first LR':>10} {'peak LR':>10} {'at step':>8} {'final LR':>10}",
    ]
    for name, g in table["groups"].items():
        lines.append(
            f"{name:<20} {g['first_lr']:>10.3g} {g['peak_lr']:>10.3g} {g['peak_step']:>8} {g['final_lr']:>10.3g}"
        )
    lines += [f"note: {n}" for n in table["notes"]]
    return "\n".join(lines)
