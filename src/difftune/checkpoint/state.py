"""Save and restore everything a run needs to continue bit-exactly.

Layout of one save, `checkpoints/step-000120/`:
  <export>                 what users load (diffusers folder, or LoRA file), written by the network
  training_state/
    trainable.safetensors  every trainable tensor, fp32 as trained
    optimizer.pt           optimizer state (tensors and numbers only: loaded with weights_only=True)
    scheduler.pt           LR scheduler state
    rng.pt                 torch / CUDA RNG states
    trainer_state.json     step, epoch, position in the epoch, best validation so far
`checkpoints/latest.json` names the newest save that has training state.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from difftune.checkpoint.atomic import atomic_directory, atomic_write_json

STATE_DIR = "training_state"
LATEST = "latest.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    step: int = 0
    """Optimizer steps completed."""
    epoch: int = 0
    """Current epoch (0-based)."""
    batch_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed."""
    best_val_loss: float | None = None
    best_val_step: int | None = None
    elapsed_seconds: float = 0.0


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(
    checkpoints_dir: Path,
    name: str,
    *,
    export,
    trainable: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    trainer_state: TrainerState | None,
) -> Path:
    """Write one checkpoint atomically. `export(directory)` writes the user-facing files; training
    state is added when `trainer_state` is given."""
    final = Path(checkpoints_dir) / name
    with atomic_directory(final) as tmp:
        export(tmp)
        if trainer_state is not None:
            state_dir = tmp / STATE_DIR
            state_dir.mkdir()
            save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, state_dir / "trainable.safetensors")
            torch.save(optimizer.state_dict(), state_dir / "optimizer.pt")
            torch.save(scheduler.state_dict(), state_dir / "scheduler.pt")
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, state_dir / "rng.pt")
            (state_dir / "trainer_state.json").write_text(json.dumps(asdict(trainer_state), indent=2))
    if trainer_state is not None:
        atomic_write_json(Path(checkpoints_dir) / LATEST, {"checkpoint": name, "step": trainer_state.step})
    return final


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    pointer = Path(checkpoints_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(checkpoints_dir) / json.loads(pointer.read_text())["checkpoint"]
    return path if (path / STATE_DIR).is_dir() else None


def load_training_state(checkpoint: Path, optimizer, scheduler) -> tuple[dict[str, torch.Tensor], TrainerState]:
    """Restore optimizer, scheduler and RNG in place; return the trainable tensors and trainer state."""
    state_dir = Path(checkpoint) / STATE_DIR
    trainable = load_file(state_dir / "trainable.safetensors")
    optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(state_dir / "scheduler.pt", weights_only=True))
    rng = torch.load(state_dir / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    trainer_state = TrainerState(**json.loads((state_dir / "trainer_state.json").read_text()))
    return trainable, trainer_state


def prune_checkpoints(checkpoints_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step-N checkpoints; other names (e.g. final) are kept."""
    steps = sorted(
        (int(m.group(1)), p) for p in Path(checkpoints_dir).iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))
    )
    removed = []
    for _, path in steps[:-keep_last] if keep_last > 0 else steps:
        shutil.rmtree(path)
        removed.append(path)
    return removed
