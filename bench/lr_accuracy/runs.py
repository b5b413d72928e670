"""One constant-LR training run and one LR sweep of a problem, each in its own process.

Runs are cached as JSON under the work folder, so an interrupted benchmark continues where it stopped
and the analysis can be redone without training.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_common_arguments(parser, root: Path) -> None:
    """--workers, --work and --results, the same for every script of the benchmark (they share the cache)."""
    parser.add_argument("--workers", type=int, default=2, help="parallel training processes (1 thread each)")
    parser.add_argument("--work", default=str(root / "bench" / "work" / "lr_accuracy"))
    parser.add_argument("--results", default=str(root / "bench" / "results"))


def _setup_process() -> None:
    """One thread per process: the benchmark runs several processes on a shared 2-core machine, and
    oversubscribed BLAS threads spin instead of working."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl

    dl.set_verbosity_error()
    tl.set_verbosity_error()


def cached(run: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Return a run's JSON from its `cache` file when it exists; else run it (in a fresh process set-up)
    and write the file, so an interrupted benchmark continues where it stopped."""

    @functools.wraps(run)
    def wrapper(*args: Any) -> dict[str, Any]:  # called as run(*run_args, cache_path)
        *run_args, cache = args
        cache_path = Path(cache)
        if cache_path.is_file():
            return json.loads(cache_path.read_text())
        _setup_process()
        result = run(*run_args)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(result))
        return result

    return wrapper


@cached
def constant_run(problem_name: str, work: str, lr: float, seed: int) -> dict[str, Any]:
    """Train the problem at a constant `lr` for its step budget, validating 20 times; the best
    validation loss over the run is what the grid compares (the step finder would stop there)."""
    from bench.lr_accuracy.problems import PROBLEMS

    from difftune.config.loading import validate_config

    problem = PROBLEMS[problem_name]
    data = problem.config(Path(work))
    data["train"].update({"lr": lr, "seed": seed, "max_steps": problem.steps, "lr_scheduler": "constant"})
    data["output"]["dir"] = str(Path(work) / "runs" / f"{problem_name}-lr{lr:g}-s{seed}")
    config = validate_config(data, f"{problem_name} grid run")
    return {"problem": problem_name, "lr": lr, "seed": seed, "steps": problem.steps,
            **validated_run(config, problem.steps)}


def validated_run(config, steps: int) -> dict[str, Any]:
    """Train `config` for `steps`, validating 20 times: the curve, its best loss (inf when it diverged) and
    the time taken."""
    from difftune.training.loop import Trainer, TrainingDiverged

    started = time.perf_counter()
    trainer = Trainer(config, show_progress=False)
    every = max(1, steps // 20)
    curve = [(0, trainer.validate()["val_loss"])]
    groups = trainer.step_groups()
    diverged = False
    train_seconds = 0.0
    try:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            trainer.train_step(next(groups))
            train_seconds += time.perf_counter() - t0
            if step % every == 0 or step == steps:
                curve.append((step, trainer.validate()["val_loss"]))
    except TrainingDiverged:
        diverged = True
    finally:
        trainer.close()  # built and stepped by hand, never run(): release the run directory
    finite = [v for _, v in curve if math.isfinite(v)]
    return {"curve": curve, "best_val_loss": min(finite) if finite and not diverged else math.inf,
            "best_step": min(curve, key=lambda sv: sv[1])[0] if finite else None, "diverged": diverged,
            "seconds": time.perf_counter() - started, "train_seconds": train_seconds}


@cached
def sweep_run(problem_name: str, work: str, seed: int, shape: str) -> dict[str, Any]:
    """`difftune find-lr` on the problem (the real command's code path), with the problem's range."""
    from bench.lr_accuracy.problems import PROBLEMS

    from difftune.config.loading import validate_config
    from difftune.tuning.lr_finder import find_lr

    problem = PROBLEMS[problem_name]
    data = problem.config(Path(work))
    data["train"].update({"seed": seed, "max_steps": problem.steps})
    data["find_lr"] = {**problem.find_lr, "shape": shape}
    data["output"]["dir"] = str(Path(work) / "runs" / f"{problem_name}-sweep-{shape}-s{seed}")
    config = validate_config(data, f"{problem_name} sweep")
    started = time.perf_counter()
    result = find_lr(config, show_progress=False)
    result["bench"] = {"problem": problem_name, "seed": seed, "shape": shape, "seconds": time.perf_counter() - started}
    return result
