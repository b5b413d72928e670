"""LR-finder accuracy against a brute-force grid (a benchmark, not a test).

For every problem (bench/lr_accuracy/problems.py):
1. a grid of constant LRs (log-spaced, bracketing the optimum) x 3 seeds, each trained to the same
   step budget; a run's score is its best validation loss (what the step finder would keep). The
   grid's *good band* is the LRs whose mean best loss is within 2% of the grid's best.
2. `difftune find-lr` (log sweep, once per seed, and the linear sweep once), read by every rule
   (default, valley, steepest, midpoint, min_div10) on the same curves.
3. a check run at the default rule's LR with both seeds: the measured regret; and the same at each
   candidate factor below the stability edge (DIVISOR_SCAN), which is how the default factor was chosen.

Reports whether each rule's LR lands in the good band, its regret, whether the bootstrap band covers
the grid optimum, and the sweep's cost as a fraction of the grid's. Results: bench/results/lr_accuracy.json
and .png; a log in bench/work/.

    python -m bench.lr_accuracy [--problems a,b] [--workers 2] [--analyse-only] [--name lr_accuracy]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `python bench/lr_accuracy/run.py` as well as `python -m bench.lr_accuracy`
    sys.path.insert(0, str(ROOT))

from bench.lr_accuracy.analysis import grid_curve, plot_benchmark, reanalyse_sweep, score_lr  # noqa: E402
from bench.lr_accuracy.problems import PROBLEMS, Problem  # noqa: E402
from bench.lr_accuracy.runs import _setup_process, add_common_arguments, constant_run, sweep_run  # noqa: E402

SEEDS = (1, 2)
"""Seeds of the sweeps and of the check runs."""
DIVISOR_SCAN = (3.5, 4.0, 4.5, 5.0)
"""Candidate factors below the stability edge for the default rule, each checked by real runs."""
GRID_SEEDS = (1, 2, 3)
"""Seeds of the grid: the good band is a 2% margin, so the grid's own seed noise must be well below it."""
RULES = ("default", "valley", "steepest", "midpoint", "min_div10")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def available(problem: Problem) -> str | None:
    """Why a problem cannot run here (a feature it needs is missing), or None."""
    if problem.needs == "lora":
        try:
            from difftune.config.loading import validate_config
            from difftune.models import load_model
            from difftune.network import build_network

            config = validate_config({"network": {"type": "lora", "rank": 4}, "model": {"path": "tiny-sd"}})
            build_network(load_model(config.model), config)
        except Exception as e:  # noqa: BLE001 - any failure means the feature is not there yet
            return f"LoRA networks are not available: {e}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default=",".join(PROBLEMS), help="comma-separated problem names")
    add_common_arguments(parser, ROOT)
    parser.add_argument("--analyse-only", action="store_true", help="no training: re-read cached runs")
    parser.add_argument("--no-divisor-scan", action="store_true", help="check runs at the default rule's LR only, "
                        "not at every factor of DIVISOR_SCAN (the factor is fixed; held-out problems test it)")
    parser.add_argument("--name", default="lr_accuracy", help="results file name (NAME.json / NAME.png), so a run of "
                        "some problems does not replace the report of all of them")
    args = parser.parse_args(argv)
    _setup_process()  # the base pre-training runs here, in the main process
    work, results_dir = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    problems = {}
    for name in args.problems.split(","):
        problem = PROBLEMS[name]
        reason = available(problem)
        if reason:
            log(f"skipping {name}: {reason}")
            continue
        problems[name] = problem
    if not args.analyse_only:
        for problem in problems.values():
            log(f"preparing {problem.name}")
            problem.prepare(work)

    pool = ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn"))
    try:
        # Sweeps first: they are what is measured, and the check runs need them.
        sweep_jobs, grid_jobs = {}, {}
        for name in problems:
            for seed in SEEDS:
                sweep_jobs[(name, seed, "log")] = _submit(pool, args, sweep_run, name, str(work), seed, "log",
                                                          str(work / "cache" / name / f"sweep-log-s{seed}.json"))
            sweep_jobs[(name, 1, "linear")] = _submit(pool, args, sweep_run, name, str(work), 1, "linear",
                                                      str(work / "cache" / name / "sweep-linear-s1.json"))
            for lr in problems[name].grid:
                for seed in GRID_SEEDS:
                    grid_jobs[(name, lr, seed)] = _submit(pool, args, constant_run, name, str(work), lr, seed,
                                                          str(work / "cache" / name / f"grid-lr{lr:g}-s{seed}.json"))
        sweeps = _collect(sweep_jobs, "sweep")
        check_jobs = {}
        for (name, seed, shape), sweep in sweeps.items():
            if sweep is None or shape != "log":
                continue
            lr = _reanalysed(work, name, sweep)["default"].lr
            if lr is not None:
                check_jobs[(name, seed)] = _submit(pool, args, constant_run, name, str(work), float(f"{lr:.4g}"), seed,
                                                   str(work / "cache" / name / f"check-lr{lr:.4g}-s{seed}.json"))
        scan_jobs = {}
        for (name, seed, shape), sweep in sweeps.items():
            edge = _reanalysed(work, name, sweep)["default"].lr_edge if sweep is not None and shape == "log" else None
            for divisor in DIVISOR_SCAN if edge and not args.no_divisor_scan else ():
                lr = float(f"{edge / divisor:.4g}")
                scan_jobs[(name, seed, divisor)] = _submit(pool, args, constant_run, name, str(work), lr, seed,
                                                           str(work / "cache" / name / f"check-lr{lr:.4g}-s{seed}.json"))
        grids = _collect(grid_jobs, "grid run")
        checks = _collect(check_jobs, "check run")
        scans = _collect(scan_jobs, "divisor check run")
    finally:
        pool.shutdown()

    report = build_report(problems, work, sweeps, grids, checks)
    report["divisor_scan"] = divisor_scan(report, scans)
    report["wall_seconds"] = time.perf_counter() - started
    out_json = results_dir / f"{args.name}.json"
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    plot_benchmark(report, results_dir / f"{args.name}.png")
    (results_dir / f"{args.name}.md").write_text(format_table(report) + "\n")
    print(format_table(report))
    log(f"wrote {out_json}, .md and .png in {report['wall_seconds']:.0f}s")
    return 0


def _submit(pool, args, fn, *fn_args):
    if args.analyse_only:
        cache = Path(fn_args[-1])
        return cache if cache.is_file() else None
    return pool.submit(fn, *fn_args)


def _collect(jobs: dict, what: str) -> dict:
    out = {}
    for key, job in jobs.items():
        if job is None:
            out[key] = None
            continue
        if isinstance(job, Path):
            out[key] = json.loads(job.read_text())
            continue
        try:
            out[key] = job.result()
            log(f"{what} {key}: done")
        except Exception as e:  # noqa: BLE001 - one failed run is reported, the others still count
            log(f"{what} {key}: FAILED {type(e).__name__}: {e}")
            out[key] = None
    return out


_REANALYSED: dict[tuple, dict] = {}


def _reanalysed(work: Path, name: str, sweep: dict[str, Any]) -> dict[str, Any]:
    """Every rule's reading of a cached sweep, with the current code (rules can change after the sweep)."""
    key = (name, sweep["bench"]["seed"], sweep["bench"]["shape"])
    if key not in _REANALYSED:
        npz = Path(sweep["files"]["probe_losses"])
        stopped = sweep["sweep"]["stopped"] is not None
        _REANALYSED[key] = {
            rule: reanalyse_sweep(npz, rule, 1.0, 200 if rule == "default" else 0, 3, stopped) for rule in RULES
        }
    return _REANALYSED[key]


def build_report(problems, work, sweeps, grids, checks) -> dict[str, Any]:
    import torch

    report: dict[str, Any] = {
        "description": __doc__.strip().splitlines()[0],
        "good_band_tolerance": 0.02,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads_per_process": 1},
        "problems": {},
    }
    for name, problem in problems.items():
        runs = [r for (n, _, _), r in grids.items() if n == name and r is not None]
        if not runs:
            continue
        grid = grid_curve(runs)
        entry: dict[str, Any] = {"description": problem.description, "steps": problem.steps, "grid": grid, "sweeps": []}
        for (n, seed, shape), sweep in sweeps.items():
            if n != name or sweep is None:
                continue
            readings = _reanalysed(work, name, sweep)
            default = readings["default"]
            rules = {rule: score_lr(readings[rule].lr, grid) for rule in RULES}
            band = default.lr_band
            entry["sweeps"].append({
                "seed": seed, "shape": shape, "status": default.status, "verdict": default.verdict,
                "lr_min": default.lr_min, "lr_max": default.lr_max, "lr_edge": default.lr_edge, "lr_band": band,
                "band_covers_grid_optimum": bool(band and band[0] <= grid["best_lr"] <= band[2]),
                "band_overlaps_good_band": bool(band and band[0] <= grid["good_interval"][1]
                                                and band[2] >= grid["good_interval"][0]),
                "rules": rules,
                "cost": {
                    "steps": sweep["cost"]["steps"], "probe_evaluations": sweep["cost"]["probe_evaluations"],
                    "seconds": sweep["bench"]["seconds"],
                    "fraction_of_grid_steps": sweep["cost"]["steps"] / grid["steps"],
                    "fraction_of_grid_seconds": sweep["bench"]["seconds"] / grid["seconds"],
                    # against the smallest grid the issue allows (8 LRs x 2 seeds), at this grid's mean run time
                    "fraction_of_8x2_grid_seconds": sweep["bench"]["seconds"] / (16 * grid["seconds"] / len(runs)),
                },
                "curve": [{"lr": c["lr"], "score": c["score"]} for c in sweep["curve"]],
                "stopped": sweep["sweep"]["stopped"],
            })
        entry["sweeps"].sort(key=lambda s: (s["shape"] != "log", s["seed"]))
        measured = [r for (n, _), r in checks.items() if n == name and r is not None]
        if measured:
            mean = sum(r["best_val_loss"] for r in measured) / len(measured)
            entry["check_runs"] = {
                "runs": [{"lr": r["lr"], "seed": r["seed"], "best_val_loss": r["best_val_loss"]} for r in measured],
                "mean_best_val_loss": mean,
                "measured_regret": mean / grid["best_loss"] - 1.0 if math.isfinite(mean) else math.inf,
                "within_2_percent": mean <= grid["best_loss"] * 1.02,
            }
        report["problems"][name] = entry
    report["summary"] = summarise(report)
    return report


def divisor_scan(report: dict[str, Any], scans: dict) -> dict[str, Any]:
    """How the default rule's factor below the edge was chosen: per candidate, the grid regret
    (interpolated) and the measured regret of real runs at that LR (mean of the sweep seeds)."""
    out: dict[str, Any] = {}
    for divisor in DIVISOR_SCAN:
        rows = {}
        for name, p in report["problems"].items():
            runs = [r for (n, _, d), r in scans.items() if n == name and d == divisor and r is not None]
            if not runs:
                continue
            mean = sum(r["best_val_loss"] for r in runs) / len(runs)
            graded = score_lr(runs[0]["lr"], p["grid"])
            rows[name] = {"lr": runs[0]["lr"], "in_good_band": graded["in_good_band"], "grid_regret": graded["regret"],
                          "measured_regret": mean / p["grid"]["best_loss"] - 1.0 if math.isfinite(mean) else math.inf}
        measured = [r["measured_regret"] for r in rows.values()]
        out[str(divisor)] = {"problems": rows, "in_good_band": sum(r["in_good_band"] for r in rows.values()),
                             "worst_measured_regret": max(measured) if measured else None}
    return out


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Per rule: on how many problem x sweep cases it lands in the good band, and its worst regret."""
    out = {}
    for rule in RULES:
        cases = [(name, s) for name, p in report["problems"].items() for s in p["sweeps"] if s["shape"] == "log"]
        hits = [s["rules"][rule]["in_good_band"] for _, s in cases]
        regrets = [s["rules"][rule]["regret"] for _, s in cases if s["rules"][rule]["regret"] is not None]
        out[rule] = {
            "log_sweeps_in_good_band": f"{sum(hits)}/{len(hits)}",
            "every_problem_in_band": all(hits) if hits else False,
            "median_regret": float(sorted(regrets)[len(regrets) // 2]) if regrets else None,
            "worst_regret": max(regrets) if regrets else None,
        }
    costs = [s["cost"]["fraction_of_grid_seconds"] for p in report["problems"].values() for s in p["sweeps"]]
    out["max_sweep_cost_fraction_of_grid_seconds"] = max(costs) if costs else None
    costs = [s["cost"]["fraction_of_8x2_grid_seconds"] for p in report["problems"].values() for s in p["sweeps"]]
    out["max_sweep_cost_fraction_of_8x2_grid_seconds"] = max(costs) if costs else None
    return out


def format_table(report: dict[str, Any]) -> str:
    lines = ["", "| problem | sweep | grid best lr | good band | " + " | ".join(RULES) + " | band 10-90% | covers opt | cost (time) |",
             "|---" * (8 + len(RULES)) + "|"]
    for name, p in report["problems"].items():
        g = p["grid"]
        for s in p["sweeps"]:
            cells = []
            for rule in RULES:
                r = s["rules"][rule]
                if r["lr"] is None:
                    cells.append("none")
                else:
                    regret = "out of grid" if r["regret"] is None else f"{100 * r['regret']:+.1f}%"
                    cells.append(f"{r['lr']:.2g} {'IN' if r['in_good_band'] else 'out'} ({regret})")
            band = s["lr_band"]
            band_text = f"{band[0]:.2g}-{band[2]:.2g}" if band else "-"
            lines.append(
                f"| {name} | {s['shape']} s{s['seed']} | {g['best_lr']:.2g} | "
                f"{g['good_interval'][0]:.2g}-{g['good_interval'][1]:.2g} | " + " | ".join(cells)
                + f" | {band_text} | {'yes' if s['band_covers_grid_optimum'] else 'no'} | "
                f"{100 * s['cost']['fraction_of_grid_seconds']:.1f}% ({100 * s['cost']['fraction_of_8x2_grid_seconds']:.1f}% of 8x2) |"
            )
        if "check_runs" in p:
            c = p["check_runs"]
            lines.append(f"| {name} | check runs at default lr | | | measured regret {100 * c['measured_regret']:+.2f}% "
                         f"({'within' if c['within_2_percent'] else 'NOT within'} 2%) |")
    lines.append("")
    for divisor, scan in report.get("divisor_scan", {}).items():
        cells = ", ".join(f"{name} {100 * r['measured_regret']:+.1f}%{' (in band)' if r['in_good_band'] else ''}"
                          for name, r in scan["problems"].items())
        lines.append(f"edge / {divisor}: measured regret {cells}; worst {_pct(scan['worst_measured_regret'])}")
    lines.append("")
    for rule in RULES:
        s = report["summary"][rule]
        lines.append(f"{rule:10s} in good band {s['log_sweeps_in_good_band']}, median regret "
                     f"{_pct(s['median_regret'])}, worst {_pct(s['worst_regret'])}")
    return "\n".join(lines)


def _pct(value):
    return "n/a" if value is None else f"{100 * value:+.1f}%"


if __name__ == "__main__":
    sys.exit(main())
