"""`difftune find-steps`: train at a constant LR and stop where the validation loss bottoms out.

This is the community's second run ("run long at that LR and pick the step where validation loss is
lowest") made automatic: the run validates every `find_steps.every_n_steps` with the deterministic
probe, keeps an export of the best weights in `checkpoints/best` (output.save_best), and stops by
the early-stopping rule of `difftune.tuning.curve.EarlyStopping` (patience and Prechelt's
generalization loss GL_alpha). It writes under `<output.dir>/find-steps/`, a complete run directory.

Training is deterministic (data order and noise depend only on the seed and the step), so a fresh run
to the best step with the same settings reproduces the best checkpoint bit for bit: the step found
here is directly usable, and `auto` can keep this checkpoint instead of training again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from difftune.config.schema import Config
from difftune.tuning.common import constant_lr_changes, refuse_lr_free, sub_config
from difftune.tuning.curve import EarlyStopping, analyze_steps, json_safe

FOLDER = "find-steps"
VALIDATIONS_PER_RUN = 25
"""Default validation count over max_steps: enough points for patience to mean something."""


def step_search_config(config: Config, lr: float, folder: str = FOLDER) -> Config:
    """The find-steps run: constant `lr`, validation every N steps, best export kept, no periodic saves."""
    from difftune.reporting.digit_score import prompted_digit
    from difftune.training.plan import make_plan

    settings = config.find_steps
    max_steps = settings.max_steps or make_plan(config).total_steps
    every = settings.every_n_steps or max(1, round(max_steps / VALIDATIONS_PER_RUN))
    prompts = config.sample.prompts
    # digit prompts (the demo's data): sample at every validation, so each point of the curve has a sample score
    digits = bool(prompts) and all(prompted_digit(p) is not None for p in prompts)
    return sub_config(
        config, folder,
        train={**constant_lr_changes(config, lr), "max_steps": max_steps},
        validation={"every_n_steps": every, "every_n_epochs": 0},
        output={"save_best": True, "save_every_n_steps": None, "save_every_n_epochs": None},
        **({"sample": {"every_n_steps": every, "every_n_epochs": None}} if digits else {}),
    )


def find_steps(config: Config, lr: float | None = None, show_progress: bool = True, folder: str = FOLDER) -> dict[str, Any]:
    """Train at constant `lr` (default: train.lr) until early stopping; returns the best step and band.

    Writes find_steps.json and find_steps.png into the run folder; the best weights are in
    `<run folder>/checkpoints/best`. Holds output.dir's lock.
    """
    from difftune.training.run_lock import lock_run_dir

    with lock_run_dir(config.output.dir, "find-steps"):
        return _find_steps(config, lr, show_progress, folder)


def _find_steps(config: Config, lr: float | None, show_progress: bool, folder: str) -> dict[str, Any]:
    from difftune.checkpoint.atomic import atomic_write_json
    from difftune.errors import ConfigError
    from difftune.reporting.metrics import read_metrics
    from difftune.training.loop import Trainer, TrainingDiverged
    from difftune.tuning.plots import plot_step_search

    refuse_lr_free(config, "find-steps")
    lr = config.train.lr if lr is None else lr
    if lr <= 0:
        raise ConfigError(f"--lr {lr}: the learning rate must be positive")
    settings = config.find_steps
    run_config = step_search_config(config, lr, folder)
    stopper = EarlyStopping(settings.patience or None, settings.gl_alpha or None, settings.min_delta,
                            settings.gl_consecutive) if (settings.patience or settings.gl_alpha) else None
    started = time.perf_counter()
    trainer = Trainer(run_config, show_progress=show_progress, early_stopping=stopper)
    if trainer.val_probe is None:
        trainer.close()
        raise ConfigError(
            "find-steps needs validation images: set data.val_split > 0 or data.val_dir "
            f"(the run would have no validation loss to stop on); config {config.output.dir}"
        )
    diverged = None
    try:
        steps_done = trainer.run()["steps"]
    except TrainingDiverged as e:  # between validations: the curve so far and the best export still stand
        steps_done, diverged = trainer.state.step, f"training diverged: {e.what}"
    root = trainer.run_dir.root
    records = read_metrics(trainer.run_dir.metrics)
    curve = [
        {k: r[k] for k in ("step", "val_loss", "val_loss_raw", "val_loss_ema", "stable_train_loss",
                           "sample_digit_score") if k in r}
        for r in records if r.get("val_loss") is not None
    ]
    analysis = analyze_steps([c["step"] for c in curve], [c["val_loss"] for c in curve], settings.margin)
    best_dir = trainer.run_dir.checkpoints / "best"
    result = {
        "lr": lr,
        # With ema.use_for = validation the curve, the stop and the best step are the EMA weights' (ema.py).
        "weights": "ema" if run_config.ema.enabled and "validation" in run_config.ema.use_for else "training",
        **analysis.to_json(),
        "early_stop": diverged or (stopper.reason if stopper is not None else None),
        "stopped_at": steps_done,
        "max_steps": run_config.train.max_steps,
        "every_n_steps": run_config.validation.every_n_steps,
        "criteria": {"patience": settings.patience, "gl_alpha": settings.gl_alpha,
                     "gl_consecutive": settings.gl_consecutive, "min_delta": settings.min_delta},
        "curve": curve,
        "best_checkpoint": str(best_dir) if best_dir.is_dir() else None,
        "run_dir": str(root),
        "cost": {"steps": steps_done, "seconds": time.perf_counter() - started},
    }
    files = {"json": root / "find_steps.json", "plot": root / "find_steps.png"}
    result["files"] = {k: str(v) for k, v in files.items()}
    result = json_safe(result)
    plot_step_search(result, files["plot"])
    atomic_write_json(files["json"], result)
    del trainer
    return result


def format_result(result: dict[str, Any]) -> str:
    """The human summary printed by `difftune find-steps`."""
    band = result.get("step_band")
    lines = [
        f"verdict: {result['verdict']}",
        f"lr {result['lr']:.3g}: best validation loss {result['best_loss']:.5f} at step {result['best_step']}"
        + (" (EMA weights)" if result.get("weights") == "ema" else "")
        if result.get("best_loss") is not None else f"lr {result['lr']:.3g}: no validation loss",
    ]
    if band:
        lines.append(
            f"steps within {100 * result['margin']:g}% of the best: {band[0]}..{band[1]} "
            f"(earliest as good: step {result['earliest_good_step']})"
        )
    if result.get("early_stop"):
        lines.append(f"stopped early at step {result['stopped_at']}: {result['early_stop']}")
    else:
        lines.append(f"trained all {result['stopped_at']} steps (no early stop)")
    if result.get("best_checkpoint"):
        lines.append(f"best weights: {result['best_checkpoint']}")
    lines.append(f"files: {result['files']['plot']}, {result['files']['json']}  ({result['cost']['seconds']:.1f}s)")
    return "\n".join(lines)


def best_checkpoint_path(result: dict[str, Any]) -> Path | None:
    return Path(result["best_checkpoint"]) if result.get("best_checkpoint") else None
