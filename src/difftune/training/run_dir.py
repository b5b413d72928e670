"""The run directory contract (docs/design.md): where every output of a run lives."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from difftune.checkpoint.atomic import remove_tree
from difftune.checkpoint.state import clean_leftovers, format_bytes, resumable_candidates
from difftune.config.loading import (
    ConfigError,
    config_to_dict,
    read_config_file,
    validate_config,
    write_resolved_config,
)
from difftune.config.schema import Config
from difftune.errors import CheckpointError
from difftune.reporting.metrics import read_metrics
from difftune.training.run_lock import RunLock, lock_run_dir

RESOLVED_CONFIG = "config.resolved.toml"
MAY_CHANGE_ON_RESUME = (
    "train.max_steps", "train.max_epochs", "output.", "sample.", "validation.every_n_steps",
    "validation.every_n_epochs", "data.num_workers", "data.offload_encoders", "train.blocks_to_swap",
    "data.latent_cache_dir", "ema.",
)
"""Settings a resumed run may change: its length, what it saves, samples and logs, how often it
validates, and where frozen weights wait (offloaded encoders, swapped blocks: the numbers are the same,
tests/test_memory.py), and the EMA (it reads the training weights, never changes them). Anything else would make the continued run a different training than the one saved."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / RESOLVED_CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"


def open_run_dir(config: Config, resuming: bool, command: str = "train") -> tuple[RunDir, RunLock, list[str]]:
    """Lock the run directory, create (or reopen, when resuming) it and write the resolved config.

    Returns the directory, its lock (the caller releases it when the run ends) and notes for the user
    (a stale lock taken over, leftovers of an interrupted save removed). A fresh run refuses a directory
    that already holds one, so no earlier result is lost by accident.
    """
    run = RunDir(Path(config.output.dir))
    if resuming and not run.root.is_dir():
        raise CheckpointError(f"--resume {run.root}: folder not found (expected the output.dir of an earlier run)")
    lock = lock_run_dir(run.root, command)  # first: nothing below may race another process
    try:
        notes = [lock.took_over] if lock.took_over else []
        if not resuming and run.metrics.exists():
            if not config.output.overwrite:
                raise ConfigError(_holds_a_run(run))
            # The old run's saves go first and its metrics.jsonl (what marks a run) last, each folder renamed
            # before it is deleted: an interrupted overwrite never leaves old saves a later resume would take.
            for path in (run.checkpoints, run.samples, run.plots, run.tensorboard):
                remove_tree(path)
            from difftune.reporting.wandb_sink import ID_FILE

            for path in (run.summary, run.root / ID_FILE, run.metrics):  # a new run is a new W&B run too
                path.unlink(missing_ok=True)
        if resuming and run.config.exists():
            _refuse_changed_training(config, run)
        done, freed = clean_leftovers([run.root, run.checkpoints, run.samples, run.plots])
        if done:
            notes.append(f"cleaned up after an interrupted run: {'; '.join(done)} — {format_bytes(freed)} freed")
        for path in (run.root, run.checkpoints, run.samples, run.plots):
            path.mkdir(parents=True, exist_ok=True)
        write_resolved_config(config, run.config)
    except BaseException:
        lock.release()
        raise
    return run, lock, notes


def _holds_a_run(run: RunDir) -> str:
    """Why a fresh run refuses `run`, and what to do: resume it, or (with nothing to resume) overwrite it."""
    if resumable_candidates(run.checkpoints):
        return (f"output.dir = '{run.root}' already holds a run (metrics.jsonl). Use `--resume {run.root}` to "
                "continue it, choose another output.dir, or set output.overwrite = true to replace it")
    steps = [r.get("step", 0) for r in read_metrics(run.metrics)]
    return (f"output.dir = '{run.root}' holds a run that stopped at step {max(steps, default=0)} before its first "
            "resumable save, so there is nothing to resume. Start it again with --set output.overwrite=true "
            "(or output.overwrite = true in the config), or choose another output.dir")


def _refuse_changed_training(config: Config, run: RunDir) -> None:
    """A resume continues the saved training: its optimizer, schedule and data order come from the
    checkpoint, so a changed LR or dataset would be recorded but not (or only half) in effect."""

    def flat(c: Config) -> dict:
        return {f"{section}.{key}": value for section, keys in config_to_dict(c).items() for key, value in keys.items()}

    saved = flat(validate_config(read_config_file(run.config), str(run.config)))
    wanted = flat(config)
    changed = [
        f"{key}: {saved.get(key, '(default)')!r} in the run, {wanted.get(key, '(default)')!r} now"
        for key in sorted(saved.keys() | wanted.keys())
        if saved.get(key) != wanted.get(key) and not key.startswith(MAY_CHANGE_ON_RESUME)
    ]
    if changed:
        listing = "\n  ".join(changed)
        raise ConfigError(
            f"--resume {run.root}: the config differs from the run's {RESOLVED_CONFIG}:\n  {listing}\n"
            "A resume continues the same training; only these may change: "
            f"{', '.join(k + '*' if k.endswith('.') else k for k in MAY_CHANGE_ON_RESUME)}. Resume with the run's own "
            f"config (`difftune train {run.config} --resume {run.root}`), or start a new run in another output.dir"
        )
