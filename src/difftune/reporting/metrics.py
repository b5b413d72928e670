"""Append-only metrics: one JSON object per optimizer step in metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = True, purge_step: int | None = None, wandb=None):
        """`purge_step`: a resumed run logs again from this step; TensorBoard then hides the events an
        earlier session logged at or after it (metrics.jsonl is truncated by the resume itself).
        `wandb`: a reporting/wandb_sink.WandbSink, or None."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._writer = None
        self.wandb = wandb
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge_step)

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(record)

    def log_image(self, key: str, path: Path, step: int) -> None:
        """A sample grid, to W&B (TensorBoard and the run directory have the PNG files)."""
        if self.wandb is not None:
            self.wandb.log_image(key, path, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()
        if self.wandb is not None:
            self.wandb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the last line of a killed process may be cut short; resume redoes that step
    return records


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after `last_step` (they are redone when a run resumes from that step)."""
    from difftune.checkpoint.atomic import atomic_write_text

    records = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    atomic_write_text(Path(path), "".join(json.dumps(r) + "\n" for r in records))
