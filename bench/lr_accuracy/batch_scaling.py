"""How does find-lr's LR move with the batch size? (a benchmark, not a test)

On two problems of bench/lr_accuracy (a full fine-tune and a LoRA), `find-lr` at batch 1, 2, 4, 8 and
16 (seeds 1 and 2, everything else the problem's config). Fits the exponent k of lr ∝ batch^k by least
squares on log lr against log batch, and compares it with the rules users apply when they change the
batch: EveryDream2's √batch (`train.scale_lr = "sqrt"`, k = 0.5), the linear rule (k = 1) and none (k = 0).

    python -m bench.lr_accuracy.batch_scaling [--workers 2]

Results: bench/results/lr_batch_scaling.json, .md and .png; sweeps cached under bench/work/lr_accuracy/cache.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from bench.lr_accuracy.problems import PROBLEMS  # noqa: E402
from bench.lr_accuracy.runs import _setup_process, add_common_arguments, cached  # noqa: E402

BATCHES = (1, 2, 4, 8, 16)
SEEDS = (1, 2)
STUDIED = ("digits-full", "lora-concept")
RULES = {"none": 0.0, "sqrt (EveryDream2, scale_lr = sqrt)": 0.5, "linear": 1.0}


@cached
def batch_sweep(problem_name: str, work: str, batch: int, seed: int) -> dict[str, Any]:
    """find-lr (log sweep, the problem's range) at `batch`."""
    from difftune.config.loading import validate_config
    from difftune.tuning.lr_finder import find_lr

    problem = PROBLEMS[problem_name]
    data = problem.config(Path(work))
    data["train"].update({"seed": seed, "max_steps": problem.steps, "batch_size": batch})
    data["find_lr"] = {**problem.find_lr, "shape": "log"}
    data["output"]["dir"] = str(Path(work) / "runs" / f"{problem_name}-batch{batch}-s{seed}")
    started = time.perf_counter()
    result = find_lr(validate_config(data, f"{problem_name} batch {batch}"), show_progress=False)
    keep = ("lr", "lr_min", "lr_max", "lr_edge", "verdict", "status")
    return {"problem": problem_name, "batch": batch, "seed": seed, **{k: result.get(k) for k in keep},
            "seconds": time.perf_counter() - started}


def fit_exponent(points: list[tuple[int, float]]) -> dict[str, Any]:
    """Least-squares slope of log lr on log batch, with its standard error."""
    x = np.log([b for b, _ in points])
    y = np.log([lr for _, lr in points])
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    se = math.sqrt(float(residual @ residual) / max(1, len(x) - 2) / float(((x - x.mean()) ** 2).sum()))
    return {"exponent": float(slope), "standard_error": se, "points": len(points)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, ROOT)
    args = parser.parse_args(argv)
    _setup_process()
    work, results = Path(args.work), Path(args.results)
    for name in STUDIED:
        PROBLEMS[name].prepare(work)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        jobs = {(n, b, s): pool.submit(batch_sweep, n, str(work), b, s,
                                       str(work / "cache" / n / f"batch{b}-sweep-s{s}.json"))
                for n in STUDIED for b in BATCHES for s in SEEDS}
        sweeps = {key: job.result() for key, job in jobs.items()}
    report: dict[str, Any] = {"description": __doc__.split("\n\n")[0], "batches": list(BATCHES), "seeds": list(SEEDS),
                              "problems": {}, "wall_seconds": time.perf_counter() - started}
    for name in STUDIED:
        runs = [sweeps[(name, b, s)] for b in BATCHES for s in SEEDS]
        points = [(r["batch"], r["lr"]) for r in runs if r["lr"]]
        report["problems"][name] = {"description": PROBLEMS[name].description, "sweeps": runs,
                                    "fit": fit_exponent(points) if len(points) >= 3 else None}
    fits = [e["fit"]["exponent"] for e in report["problems"].values() if e["fit"]]
    report["mean_exponent"] = float(np.mean(fits)) if fits else None
    (results / "lr_batch_scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / "lr_batch_scaling.md").write_text(format_table(report) + "\n")
    plot(report, results / "lr_batch_scaling.png")
    print(format_table(report))
    return 0


def format_table(report: dict[str, Any]) -> str:
    lines = ["| problem | " + " | ".join(f"batch {b}" for b in report["batches"]) + " | fitted exponent k (lr ∝ batch^k) |",
             "|---|" + "---|" * len(report["batches"]) + "---|"]
    for name, e in report["problems"].items():
        cells = []
        for b in report["batches"]:
            lrs = [r["lr"] for r in e["sweeps"] if r["batch"] == b]
            cells.append(" / ".join("none" if lr is None else f"{lr:.3g}" for lr in lrs))
        fit = e["fit"]
        lines.append(f"| {name} | " + " | ".join(cells) + " | "
                     + (f"{fit['exponent']:.2f} ± {fit['standard_error']:.2f}" if fit else "n/a") + " |")
    lines.append("")
    lines.append("(find-lr's recommended LR, seeds " + " / ".join(map(str, report["seeds"])) + ")")
    if report["mean_exponent"] is not None:
        k = report["mean_exponent"]
        lines.append(f"mean exponent {k:.2f}; going from batch 1 to 16 each rule predicts: "
                     + ", ".join(f"{rule} x{16 ** e:.3g}" for rule, e in RULES.items()) + f", measured x{16 ** k:.3g}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, e in report["problems"].items():
        pts = [(r["batch"], r["lr"]) for r in e["sweeps"] if r["lr"]]
        line = ax.plot(*zip(*pts, strict=True), "o", alpha=0.7, label=name)[0]
        if e["fit"]:
            first = math.exp(np.mean([math.log(lr) for b, lr in pts if b == pts[0][0]]))
            xs = np.array(report["batches"], dtype=float)
            ax.plot(xs, first * (xs / pts[0][0]) ** e["fit"]["exponent"], "-", color=line.get_color(),
                    label=f"fit k = {e['fit']['exponent']:.2f}")
            ax.plot(xs, first * (xs / pts[0][0]) ** 0.5, ":", color=line.get_color(), label="√batch rule")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("find-lr's LR")
    ax.legend(fontsize=7)
    ax.set_title("find-lr's LR against the batch size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
