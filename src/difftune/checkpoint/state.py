"""Save and restore everything a run needs to continue bit-exactly, and never lose a save.

Layout of one save, `checkpoints/step-000120/`:
  <export>                 what users load (diffusers folder, or LoRA file), written by the network
  training_state/
    trainable.safetensors  every trainable tensor, fp32 as trained
    optimizer.pt           optimizer state (tensors and numbers only: loaded with weights_only=True)
    scheduler.pt           LR scheduler state
    rng.pt                 torch / CUDA RNG states
    trainer_state.json     step, epoch, position in the epoch, best validation so far
  manifest.json            size and sha256 of every file above, written last (checkpoint/manifest.py)
`checkpoints/latest.json` names the newest save that has training state (for people and scripts; a
resume does not trust it: it verifies the saves newest first and takes the first intact one).

A save is written into `.tmp-<name>-*` and renamed into place when complete; the leftovers of a
process killed mid-save are removed by the next run that opens the folder (`clean_leftovers`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from difftune.checkpoint.atomic import (
    OLD_PREFIX,
    TEMP_PREFIX,
    atomic_directory,
    atomic_write_json,
    remove_tree,
)
from difftune.checkpoint.manifest import MANIFEST, save_bytes, verify_save, write_manifest
from difftune.errors import CheckpointError, DiskFullError

STATE_DIR = "training_state"
LATEST = "latest.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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
    """Wall time of all sessions of the run up to this state (start-up excluded)."""
    ema_updates: int = 0
    """Updates of the EMA (training/ema.py) so far; 0 without one."""


@dataclass
class TrainingState:
    """What a resume needs besides the export: the trainer writes it in training mode."""

    trainable: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    trainer_state: TrainerState


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


# ------------------------------------------------------------------------------------------- save
def save_checkpoint(checkpoints_dir: Path, name: str, *, export: Callable[[Path], None],
                    state: TrainingState | None, fault_hook: Callable[[str], None] | None = None) -> Path:
    """Write one save atomically: the training state (if any), then `export(directory)`, then the manifest.

    Running out of space raises DiskFullError naming the folder and the size of the previous save;
    the partial save is removed and every earlier save stays as it was. `fault_hook(point)` is called
    between the stages ("state", "export", "manifest") so tests can kill a save at a chosen point.
    """
    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / name
    hook = fault_hook or (lambda point: None)
    try:
        with atomic_directory(final) as tmp:
            try:
                if state is not None:
                    _write_state(tmp / STATE_DIR, state)
                hook("state")
                export(tmp)
                hook("export")
                write_manifest(tmp, state.trainer_state.step if state is not None else None)
                hook("manifest")
            except Exception as e:  # writers report a full disk as OSError, SafetensorError or RuntimeError
                if is_disk_full(e, checkpoints_dir):
                    raise _disk_full(checkpoints_dir, name, written=_tree_bytes(tmp)) from None
                raise
    except OSError as e:
        if is_disk_full(e, checkpoints_dir):  # the rename itself
            raise _disk_full(checkpoints_dir, name, written=0) from None
        raise
    if state is not None:
        try:
            atomic_write_json(checkpoints_dir / LATEST, {"checkpoint": name, "step": state.trainer_state.step})
        except OSError as e:
            if is_disk_full(e, checkpoints_dir):
                raise DiskFullError(f"no space left on the device of '{checkpoints_dir}' after saving {name}: the save "
                                    f"is complete (only {LATEST}, a pointer for people, could not be written); free "
                                    "space and resume with --resume") from None
            raise
    return final


DISK_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def is_disk_full(error: BaseException, folder: Path) -> bool:
    """A full disk, however the writer says it: errno ENOSPC/EDQUOT, safetensors' "os error 28", or
    torch.save's "PytorchStreamWriter failed writing" when the folder has (almost) no space left."""
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        return True
    text = str(error)
    if any(word in text for word in DISK_FULL_WORDS):
        return True
    if "failed writing" in text or "write" in text.lower():
        try:
            return shutil.disk_usage(folder).free < 1 << 20
        except OSError:
            return False
    return False


def _write_state(state_dir: Path, state: TrainingState) -> None:
    state_dir.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in state.trainable.items()}, state_dir / "trainable.safetensors")
    torch.save(state.optimizer.state_dict(), state_dir / "optimizer.pt")
    torch.save(state.scheduler.state_dict(), state_dir / "scheduler.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, state_dir / "rng.pt")
    (state_dir / "trainer_state.json").write_text(json.dumps(asdict(state.trainer_state), indent=2))


def _disk_full(checkpoints_dir: Path, name: str, written: int) -> DiskFullError:
    previous = newest_save(checkpoints_dir)
    needed = save_bytes(previous) if previous is not None else None
    free = shutil.disk_usage(checkpoints_dir).free
    need = (f"a save needs about {format_bytes(needed)} (the size of the previous save, {previous.name})"
            if needed else f"it had written {format_bytes(written)} when the disk filled")
    intact = (f"the previous save {previous.name} is intact, resume from it with --resume"
              if previous is not None else "no earlier save exists")
    return DiskFullError(f"no space left on the device of '{checkpoints_dir}' while saving {name}: {need}, "
                         f"{format_bytes(free)} are free. The partial save was removed and {intact} once there is room")


def format_bytes(n: int | float | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _tree_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            pass
    return total


FAULT_ENV = "DIFFTUNE_KILL_DURING_SAVE"
"""Fault injection for tests and bench/fault_injection.py: `export` (or `state`, `manifest`) kills the
process with SIGKILL at that point of its first save; `export:3` at that point of its third save."""


def env_fault_hook() -> Callable[[str], None] | None:
    """The save hook FAULT_ENV asks for, or None (the normal case)."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return None
    point, _, nth = wanted.partition(":")
    remaining = [int(nth or 1)]

    def hook(reached: str) -> None:
        if reached == point:
            remaining[0] -= 1
            if remaining[0] == 0:
                import signal

                os.kill(os.getpid(), signal.SIGKILL)

    return hook


# ----------------------------------------------------------------------------------------- resume
def _claimed_step(folder: Path) -> float:
    """The step a save says it holds, for ordering (a broken save still sorts where it claims to be)."""
    for read in (lambda: json.loads((folder / MANIFEST).read_text())["step"],
                 lambda: json.loads((folder / STATE_DIR / "trainer_state.json").read_text())["step"]):
        try:
            step = read()
            if isinstance(step, int):
                return step
        except (OSError, ValueError, KeyError, TypeError):
            pass
    match = STEP_DIR.match(folder.name)
    return int(match.group(1)) if match else math.inf  # `final`, unreadable: the newest a run writes


def resumable_candidates(checkpoints_dir: Path) -> list[Path]:
    """Save folders that hold (or held) training state, newest first."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
             and ((p / STATE_DIR).exists() or _manifest_lists_state(p))]
    return sorted(found, key=lambda p: (_claimed_step(p), p.stat().st_mtime), reverse=True)


def _manifest_lists_state(folder: Path) -> bool:
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        return any(name.startswith(STATE_DIR + "/") for name in files)
    except (OSError, ValueError, KeyError, TypeError):
        return (folder / MANIFEST).exists()  # an unreadable manifest: a save, and a broken one


def newest_save(checkpoints_dir: Path) -> Path | None:
    """The newest save with an intact manifest (sizes only: cheap), for messages."""
    for folder in resumable_candidates(checkpoints_dir):
        if verify_save(folder, hashes=False) is None:
            return folder
    return None


def resume_latest(checkpoints_dir: Path, optimizer, scheduler,
                  load_trainable: Callable[[dict[str, torch.Tensor]], None]) -> tuple[TrainerState, Path, list[str]]:
    """Restore the newest intact save: (trainer state, its folder, the saves skipped and why).

    Each candidate is verified against its manifest, then loaded (optimizer, scheduler, RNG and,
    through `load_trainable`, the trained weights); a save that fails either is skipped for the next
    older one, which restores everything again. CheckpointError lists every save found when none is intact.
    """
    skipped: list[str] = []
    for folder in resumable_candidates(checkpoints_dir):
        problem = verify_save(folder) if (folder / MANIFEST).exists() else None  # older saves: loading decides
        if problem is None:
            try:
                trainable, trainer_state = load_training_state(folder, optimizer, scheduler)
                load_trainable(trainable)
                return trainer_state, folder, skipped
            except Exception as e:  # any unreadable piece: this save cannot be resumed, an older one may
                problem = f"could not be loaded ({type(e).__name__}: {e})"
        skipped.append(f"{folder.name}: {problem}")
    found = "\n  ".join(skipped) if skipped else "no save with training state"
    raise CheckpointError(
        f"no resumable save in '{checkpoints_dir}':\n  {found}\n"
        "A run saves resumable state with output.save_every_n_steps / save_every_n_epochs (output.save_state = true). "
        "To start the run again from the beginning, train without --resume and with --set output.overwrite=true"
    )


def load_training_state(checkpoint: Path, optimizer, scheduler) -> tuple[dict[str, torch.Tensor], TrainerState]:
    """Restore optimizer, scheduler and RNG in place; return the trainable tensors and trainer state.

    Every file is read before anything is restored, so a save with an unreadable file leaves the
    optimizer and scheduler as they were.
    """
    state_dir = Path(checkpoint) / STATE_DIR
    trainable = load_file(state_dir / "trainable.safetensors")
    optimizer_state = torch.load(state_dir / "optimizer.pt", weights_only=True)
    scheduler_state = torch.load(state_dir / "scheduler.pt", weights_only=True)
    rng = torch.load(state_dir / "rng.pt", weights_only=True)
    trainer_state = TrainerState(**json.loads((state_dir / "trainer_state.json").read_text()))
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return trainable, trainer_state


# ---------------------------------------------------------------------------------------- tidy up
def prune_checkpoints(checkpoints_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step-N checkpoints; other names (e.g. final) are kept."""
    steps = sorted(
        (int(m.group(1)), p) for p in Path(checkpoints_dir).iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))
    )
    removed = []
    for _, path in steps[:-keep_last] if keep_last > 0 else steps:
        remove_tree(path)
        removed.append(path)
    return removed


def clean_leftovers(folders: list[Path]) -> tuple[list[str], int]:
    """Remove what interrupted writes left in `folders` (not recursive): unfinished `.tmp-*` saves and
    files, and the `.old-*` copy of a re-saved checkpoint (moved back when the new one never arrived).

    Only call it while holding the run directory's lock: then no live process is writing them.
    Returns (what was done, bytes freed).
    """
    notes, freed = [], 0
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for entry in sorted(Path(folder).iterdir()):
            name = entry.name
            if name.startswith(OLD_PREFIX):
                target = _old_copy_target(entry)
                if target is not None and not target.exists():
                    os.replace(entry, target)
                    notes.append(f"restored {target.name} (a re-save of it was interrupted)")
                    continue
            elif not name.startswith(TEMP_PREFIX):
                continue
            size = _tree_bytes(entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            freed += size
            notes.append(f"removed {Path(folder).name}/{name} ({format_bytes(size)})")
    return notes, freed


def _old_copy_target(entry: Path) -> Path | None:
    match = re.match(re.escape(OLD_PREFIX) + r"(.+)-\d+$", entry.name)
    return entry.with_name(match.group(1)) if match else None
