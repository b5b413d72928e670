"""Weights & Biases beside metrics.jsonl and TensorBoard (`output.wandb = true`; optional dependency).

The run's id is kept in the run directory (wandb_run_id.txt), so a resumed run continues the same
W&B run (resume="allow"). W&B only accepts increasing steps: the steps a resume redoes after its
save were logged already, and W&B keeps the first values it got for them (metrics.jsonl, which the
resume truncates, holds the redone ones). WANDB_MODE=offline (or `wandb offline`) keeps everything
on disk under the run directory, for `wandb sync` later.
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'difftune[wandb]' (or pip install wandb)"
ID_FILE = "wandb_run_id.txt"
"""In the run directory: the W&B run id a resume continues (an overwrite deletes it: a new W&B run)."""


def wandb_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


class WandbSink:
    def __init__(self, run_dir: Path, project: str | None, run_name: str | None, config: dict[str, Any]):
        import wandb

        id_file = Path(run_dir) / ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        if not id_file.is_file():
            id_file.write_text(run_id + "\n")
        self.last_step = -1
        self.run = wandb.init(project=project or "difftune", name=run_name or Path(run_dir).name, id=run_id,
                              resume="allow", dir=str(run_dir), config=config)

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if step < self.last_step:
            return  # redone after a resume: W&B has these steps (see the module docstring)
        values = {k: v for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        self.run.log(values, step=step)
        self.last_step = step

    def log_image(self, key: str, path: Path, step: int) -> None:
        import wandb

        if step >= self.last_step:
            self.run.log({key: wandb.Image(str(path))}, step=step)
            self.last_step = step

    def close(self) -> None:
        self.run.finish()
