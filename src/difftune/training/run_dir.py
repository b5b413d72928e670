"""The run directory contract (DESIGN.md): where every output of a run lives."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from difftune.config.loading import ConfigError, write_resolved_config
from difftune.config.schema import Config

RESOLVED_CONFIG = "config.resolved.toml"


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


def open_run_dir(config: Config, resuming: bool) -> RunDir:
    """Create (or reopen, when resuming) the run directory and write the resolved config.

    A fresh run refuses a directory that already holds one, so no earlier result is lost by accident.
    """
    run = RunDir(Path(config.output.dir))
    if not resuming and run.metrics.exists():
        if not config.output.overwrite:
            raise ConfigError(
                f"output.dir = '{run.root}' already holds a run (metrics.jsonl). Use `--resume {run.root}` to "
                "continue it, choose another output.dir, or set output.overwrite = true to replace it"
            )
        for path in (run.metrics, run.summary):
            path.unlink(missing_ok=True)
        for path in (run.checkpoints, run.samples, run.plots, run.tensorboard):
            shutil.rmtree(path, ignore_errors=True)
    for path in (run.root, run.checkpoints, run.samples, run.plots):
        path.mkdir(parents=True, exist_ok=True)
    write_resolved_config(config, run.config)
    return run
