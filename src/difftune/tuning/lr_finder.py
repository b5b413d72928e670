"""`difftune find-lr`: an LR range test on the user's real setup.

The trainer is built exactly as training builds it (model, network, optimizer, batch, precision, data
order), but its schedule is replaced by a ramp: log-spaced stairs (default; equal resolution per
decade) or the community's linear ramp. After every `steps_per_point` optimizer steps a fixed probe
(held-out items × fixed noise and stratified timesteps) is measured, so two points differ only by
what training did. The sweep stops early on divergence. The curve is read by
`difftune.tuning.curve.analyze_lr_sweep`.

Nothing the user has is touched: the sweep writes under `<output.dir>/find-lr/`, models are loaded
from their files (never written), and the trainer's weights and optimizer state are restored after
the sweep, so a caller in the same process can reuse the trainer.
"""

from __future__ import annotations

import copy
import csv
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from difftune.config.schema import Config
from difftune.optim.optimizers import default_lr_range, lr_kind
from difftune.tuning.common import format_lr, refuse_lr_free, sub_config
from difftune.tuning.curve import analyze_lr_sweep, json_safe, should_stop

FOLDER = "find-lr"


def sweep_folder(group: str) -> str:
    """Where a sweep writes under output.dir: find-lr/, or find-lr-text_encoder/ for one role's LR."""
    return FOLDER if group == "all" else f"{FOLDER}-{group}"
MAX_EXTEND = 100.0
"""With `find_lr.extend`, a sweep that has not diverged goes on up to this multiple of end_lr."""

# Used only when the optimizer catalogue has no range for an optimizer (Adam-like defaults).
_FALLBACK_RANGE = {"full": (1e-7, 1e-4), "network": (5e-6, 5e-3), "embedding": (5e-5, 5e-2)}


def lr_range(config: Config) -> tuple[float, float]:
    """The sweep's (start, end): find_lr.start_lr/end_lr, else the optimizer's usual range widened 10x."""
    try:
        low, high = default_lr_range(config.optimizer.name, lr_kind(config.network))
    except (ImportError, KeyError, ValueError):
        low, high = _FALLBACK_RANGE[lr_kind(config.network)]
    start = config.find_lr.start_lr or low
    end = config.find_lr.end_lr or high
    if start >= end:  # only one side was set, beyond the other default
        start, end = (start, start * 1000) if config.find_lr.start_lr else (end / 1000, end)
    return start, end


def ramp(start: float, end: float, num_points: int, steps_per_point: int, shape: str) -> tuple[np.ndarray, np.ndarray]:
    """LR of every optimizer step and the LR each point is labelled with (the last step's: the highest
    LR the weights have seen at that point)."""
    if shape == "log":
        point_lrs = np.geomspace(start, end, num_points)
        step_lrs = np.repeat(point_lrs, steps_per_point)
    elif shape == "linear":
        step_lrs = np.linspace(start, end, num_points * steps_per_point)
        point_lrs = step_lrs[steps_per_point - 1 :: steps_per_point]
    else:
        raise ValueError(f"find_lr.shape = {shape!r}: valid: log, linear")
    return point_lrs, step_lrs


class Ramp:
    """The LR multiplier handed to the trainer: LR of the step / the swept role's configured LR.

    A list, so the sweep can extend it while it runs (`find_lr.extend`). With a `group` (find_lr.group)
    only that role's parameter groups ramp; the others keep multiplier 1 (their configured LRs).
    """

    def __init__(self, step_lrs: np.ndarray, base_lr: float, group: str = "all"):
        self.step_lrs = [float(x) for x in step_lrs]
        self.base_lr = base_lr
        self.group = group

    def __call__(self, step: int) -> float:
        return self.step_lrs[min(step, len(self.step_lrs) - 1)] / self.base_lr

    def for_groups(self, param_groups: list[dict]) -> list:
        """One multiplier per optimizer group (LambdaLR's list form): the ramp for the swept role's groups
        ("text_encoder", "text_encoder x16", ...), a constant 1 for the rest."""
        return [self if self.group == "all" or group_role(g.get("name", "")) == self.group else _Fixed()
                for g in param_groups]


class _Fixed:
    """Multiplier 1: a group the sweep leaves at its configured LR (an object, so LambdaLR saves it)."""

    def __call__(self, step: int) -> float:
        return 1.0


def group_role(name: str) -> str:
    """The role of an optimizer group's name ("text_encoder x16" -> "text_encoder")."""
    return name.split(" x", 1)[0]


LR_KEYS = {"all": "lr", "denoiser": "lr", "text_encoder": "text_encoder_lr", "text_encoder_2": "text_encoder_2_lr",
           "embedding": "embedding_lr"}
"""The train key a sweep's recommendation is for, by find_lr.group."""


def swept_base_lr(config: Config) -> float:
    """The configured LR of the role the sweep ramps (before train.scale_lr, as train.lr is)."""
    train, group = config.train, config.find_lr.group
    te = train.text_encoder_lr if train.text_encoder_lr is not None else train.lr
    return {"text_encoder": te, "text_encoder_2": train.text_encoder_2_lr if train.text_encoder_2_lr is not None
            else te, "embedding": train.embedding_lr or train.lr}.get(group, train.lr)


def check_group(config: Config, roles: list[str]) -> None:
    """find_lr.group must name a role that trains (with a partner whose LR stays put)."""
    from difftune.errors import ConfigError

    group = config.find_lr.group
    if group == "all":
        return
    if group not in roles:
        hint = ("set train.train_text_encoder to train a text encoder, or " if group.startswith("text_encoder")
                else "")
        raise ConfigError(f"find_lr.group = '{group}': this run does not train it (it trains {', '.join(roles)}); "
                          f"{hint}use find_lr.group = 'all'")
    if roles == [group]:
        raise ConfigError(f"find_lr.group = '{group}': it is all this run trains; use find_lr.group = 'all'")


def snapshot(trainer) -> dict[str, Any]:
    """Copies of the trainable weights (on the CPU), optimizer, scheduler and position."""
    return {
        "network": {k: v.detach().clone().cpu() for k, v in trainer.network.state_dict().items()},
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
        "scheduler": copy.deepcopy(trainer.scheduler.state_dict()),
        "state": copy.deepcopy(trainer.state),
    }


def restore(trainer, saved: dict[str, Any]) -> None:
    device = trainer.accelerator.device
    trainer.network.load_state_dict({k: v.to(device) for k, v in saved["network"].items()})
    trainer.optimizer.load_state_dict(copy.deepcopy(saved["optimizer"]))
    trainer.scheduler.load_state_dict(copy.deepcopy(saved["scheduler"]))
    trainer.state = copy.deepcopy(saved["state"])


def probe_sources(trainer, config: Config) -> dict[str, list]:
    """Which images the sweep probes: {'val': held-out images, 'train': a fixed training subset}."""
    from difftune.training.plan import stable_subset

    settings = config.find_lr
    sources = {"val": trainer.plan.val_records, "train": stable_subset(trainer.plan.train_records, config)}
    wanted = ["val", "train"] if settings.probe == "both" else [settings.probe]
    if settings.probe == "val" and not sources["val"]:
        wanted = ["train"]  # no held-out images: the training subset is the only probe there is
    chosen = {name: sources[name] for name in wanted if sources[name]}
    if not chosen:
        from difftune.errors import ConfigError

        raise ConfigError(f"find_lr.probe = {settings.probe!r}: no images to probe with (no validation or training images)")
    return chosen


def describe_probes(sources: dict[str, list], config: Config) -> str:
    """'3 validation images', or what replaced them, for the sweep's header line."""
    parts = [f"{len(records)} {'validation' if name == 'val' else 'fixed training'} images"
             for name, records in sources.items()]
    if config.find_lr.probe == "val" and "val" not in sources:
        parts[-1] += " (no validation images: set data.val_split or data.val_dir for a held-out probe)"
    return " + ".join(parts)


def make_probes(trainer, config: Config) -> dict[str, Any]:
    """The fixed probes of the sweep, with enough draws per image to reach find_lr.probe_items items
    (more items, less noise in the curve)."""
    from difftune.training.validation import FixedProbe

    settings, v = config.find_lr, config.validation
    return {
        name: FixedProbe(records, config.data, v.seed,
                         max(v.draws_per_image, math.ceil(settings.probe_items / len(records))),
                         v.batch_size or config.train.batch_size)
        for name, records in probe_sources(trainer, config).items()
    }


def run_sweep(
    trainer,
    config: Config,
    ramp_fn: Ramp,
    point_lrs: np.ndarray,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train through the ramp, probing after every point; returns the raw measurements.

    The trainer's weights, optimizer state and position are restored afterwards.
    """
    from difftune.training.loop import TrainingDiverged

    settings = config.find_lr
    probes = make_probes(trainer, config)
    saved = snapshot(trainer)
    started = time.perf_counter()
    train_seconds = 0.0
    steps_done = 0
    lrs: list[float] = list(point_lrs)
    rows: list[dict[str, Any]] = []
    item_losses: list[np.ndarray] = []
    scores: list[float] = []
    stop_reason = None
    try:
        base = {name: trainer.evaluate_probe(p) for name, p in probes.items()}
        baseline = np.concatenate([r.item_losses for r in base.values()])
        buckets = np.concatenate([r.buckets for r in base.values()])
        groups = trainer.step_groups()
        point = 0
        while point < len(lrs):
            losses = []
            t0 = time.perf_counter()
            try:
                for _ in range(settings.steps_per_point):
                    group = next(groups)
                    losses.append(trainer.train_step(group))
                    steps_done += 1
            except TrainingDiverged:
                losses.append(math.inf)
            train_seconds += time.perf_counter() - t0
            if all(math.isfinite(x) for x in losses):
                results = {name: trainer.evaluate_probe(p) for name, p in probes.items()}
                items = np.concatenate([r.item_losses for r in results.values()])
            else:
                results, items = {}, np.full(baseline.shape, np.inf)
            item_losses.append(items)
            score = _score(items, baseline, buckets)
            scores.append(score)
            row = {"point": point, "lr": lrs[point], "step": trainer.state.step,
                   "train_loss": float(np.mean(losses)), "score": score}
            for name, r in results.items():
                row[f"{name}_probe_loss"] = r.loss  # beside train_loss (the training batches' loss), not over it
            rows.append(row)
            if on_point is not None:
                on_point(row)
            stop_reason = should_stop(scores, settings.stop_factor)
            if stop_reason:
                break
            point += 1
            if point == len(lrs) and _should_extend(config, lrs, point_lrs):
                factor = lrs[-1] / lrs[-2]
                lrs.append(lrs[-1] * factor)
                ramp_fn.step_lrs.extend([lrs[-1]] * settings.steps_per_point)
    finally:
        restore(trainer, saved)
    return {
        "lrs": np.asarray(lrs[: len(rows)]),
        "item_losses": np.stack(item_losses) if item_losses else np.zeros((0, 0)),
        "baseline": baseline,
        "buckets": buckets,
        "rows": rows,
        "stop_reason": stop_reason,
        "steps": steps_done,
        "probes": sorted(probes),
        "probe_evaluations": len(rows) + 1,
        "probe_items": int(baseline.size),
        "seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
    }


def _score(items: np.ndarray, baseline: np.ndarray, buckets: np.ndarray) -> float:
    from difftune.tuning.curve import bucket_scores

    return float(bucket_scores(items[None, :], baseline, buckets)[0])


def _should_extend(config: Config, lrs: list[float], planned: np.ndarray) -> bool:
    """Go past end_lr until the sweep diverges (the default rule reads the stability edge, and a loss
    that only flattened or crept up has not shown it yet), at most to MAX_EXTEND x end_lr. Called only
    when the stop rule has not fired."""
    settings = config.find_lr
    if not settings.extend or settings.shape != "log" or len(lrs) < 2:
        return False
    return lrs[-1] * (lrs[-1] / lrs[-2]) <= planned[-1] * MAX_EXTEND


def find_lr(config: Config, show_progress: bool = True) -> dict[str, Any]:
    """Run the range test for `config` and write find_lr.json, curve.csv and find_lr.png under
    `<output.dir>/find-lr/`. Returns the result (the JSON's content). Holds output.dir's lock."""
    from difftune.training.run_lock import lock_run_dir

    with lock_run_dir(config.output.dir, "find-lr"):
        return _find_lr(config, show_progress)


def _find_lr(config: Config, show_progress: bool) -> dict[str, Any]:
    from difftune.reporting.progress import Progress
    from difftune.training.loop import Trainer
    from difftune.tuning.plots import plot_lr_sweep

    refuse_lr_free(config, "find-lr")
    settings = config.find_lr
    start, end = lr_range(config)
    point_lrs, step_lrs = ramp(start, end, settings.num_points, settings.steps_per_point, settings.shape)
    sweep_config = sub_config(
        config, sweep_folder(settings.group),
        sample={"prompts": []},
        validation={"every_n_steps": None, "every_n_epochs": 0},  # the sweep scores its own probes
        output={"tensorboard": False, "save_every_n_steps": None, "save_every_n_epochs": None},
        ema={"enabled": False},  # the sweep scores the weights as they train at each LR, not a lagging average
    )
    ramp_fn = Ramp(step_lrs, swept_base_lr(config), settings.group)
    trainer = Trainer(sweep_config, show_progress=False, lr_multiplier=ramp_fn)
    try:
        check_group(config, trainer.network.trained_roles())
    except Exception:
        trainer.close()
        raise
    folder = trainer.run_dir.root
    run_steps = trainer.plan.total_steps
    progress = Progress(len(point_lrs), description="find-lr", enabled=show_progress)
    progress.write(
        f"find-lr{'' if settings.group == 'all' else ' of train.' + LR_KEYS[settings.group]}: "
        f"{settings.shape} sweep {start:.3g} → {end:.3g}, {settings.num_points} points x "
        f"{settings.steps_per_point} steps, probe: {describe_probes(probe_sources(trainer, config), config)}"
    )

    def on_point(row):
        if row["point"] >= progress.bar.total:
            progress.bar.total = row["point"] + 1
        progress.update(row["train_loss"], row["lr"], row["score"])

    try:
        raw = run_sweep(trainer, config, ramp_fn, point_lrs, on_point)
    finally:
        progress.close()
        trainer.close()
    analysis = analyze_lr_sweep(
        raw["lrs"], raw["item_losses"], raw["baseline"], raw["buckets"], rule=settings.rule,
        sigma=settings.smoothing, bootstrap_samples=settings.bootstrap_samples, seed=config.validation.seed,
        stopped_early=raw["stop_reason"] is not None, edge_divisor=settings.edge_divisor,
    )
    seconds_per_step = raw["train_seconds"] / max(1, raw["steps"])
    run_seconds = seconds_per_step * run_steps
    result = analysis.to_json()  # lr, lr_min, lr_max, lr_band, rule, status, verdict, suggestions, ...
    scores, smoothed = result.pop("score"), result.pop("smoothed")  # per point in `curve` instead
    result.update({
        "group": settings.group, "lr_key": f"train.{LR_KEYS[settings.group]}",
        "curve": [
            {**row, "score": scores[i], "smoothed": smoothed[i] if i < len(smoothed) else None}
            for i, row in enumerate(raw["rows"])
        ],
        "sweep": {
            "start_lr": start, "end_lr": end, "shape": settings.shape, "num_points": settings.num_points,
            "steps_per_point": settings.steps_per_point, "points_measured": len(raw["rows"]),
            "probe": "+".join(raw["probes"]), "probe_items": raw["probe_items"], "stopped": raw["stop_reason"],
        },
        "cost": {
            "steps": raw["steps"],
            "probe_evaluations": raw["probe_evaluations"],
            "seconds": raw["seconds"],
            "training_run_steps": run_steps,
            "fraction_of_training_run": raw["seconds"] / run_seconds if run_seconds > 0 else None,
        },
    })
    files = {"json": folder / "find_lr.json", "csv": folder / "curve.csv", "plot": folder / "find_lr.png",
             "probe_losses": folder / "probe_losses.npz"}
    result["files"] = {k: str(v) for k, v in files.items()}
    # Every probe item's loss at every point: re-read the sweep with another rule without re-running it
    # (difftune.tuning.curve.analyze_lr_sweep).
    np.savez_compressed(files["probe_losses"], lrs=raw["lrs"], item_losses=raw["item_losses"],
                        baseline=raw["baseline"], buckets=raw["buckets"])
    result = json_safe(result)
    write_curve_csv(files["csv"], result["curve"])
    plot_lr_sweep(result, files["plot"])
    from difftune.checkpoint.atomic import atomic_write_json

    atomic_write_json(files["json"], result)
    del trainer
    return result


def write_curve_csv(path: Path, curve: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for row in curve for k in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(curve)


def format_result(result: dict[str, Any]) -> str:
    """The human summary printed by `difftune find-lr`."""
    band = result.get("lr_band")
    cost = result["cost"]
    lines = [
        f"verdict: {result['verdict']}",
        f"lr_min {format_lr(result['lr_min'])}   lr_max {format_lr(result['lr_max'])}   "
        f"stability edge {format_lr(result.get('lr_edge'))}",
        f"recommended {result.get('lr_key', 'train.lr').removeprefix('train.')} ({result['rule']} rule): "
        f"{format_lr(result['lr'])}"
        + (f"   band 10/50/90%: {format_lr(band[0])} / {format_lr(band[1])} / {format_lr(band[2])}" if band else ""),
        "other rules: " + ", ".join(f"{k} {format_lr(v)}" for k, v in result["suggestions"].items() if k != result["rule"]),
    ]
    if cost.get("fraction_of_training_run") is not None:
        lines.append(
            f"cost: {cost['steps']} steps + {cost['probe_evaluations']} probe evaluations, {cost['seconds']:.1f}s "
            f"(~{100 * cost['fraction_of_training_run']:.0f}% of one {cost['training_run_steps']}-step training run)"
        )
    lines.append(f"files: {result['files']['plot']}, {result['files']['csv']}, {result['files']['json']}")
    return "\n".join(lines)
