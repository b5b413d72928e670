"""find-lr against what users pick instead of choosing an LR (a benchmark, not a test).

On every problem of bench/lr_accuracy (the same configs, step budgets and seeds as its check runs):
- LR-free optimizers: Prodigy (lr 1, d_coef 1, OneTrainer's defaults: betas 0.9/0.999, no weight decay,
  no bias correction, no safeguard warmup) and D-Adapt Adam (lr 1), each in place of the problem's
  optimizer, constant schedule;
- Smith's cyclical LR between find-lr's `lr_min` and `lr_max` of the same seed's sweep (`cyclic`,
  triangular and triangular2, two cycles over the budget);
versus the problem's own optimizer at find-lr's LR, from find-lr sweeps run again here by today's code
(the grid of bench/results/lr_accuracy*.json is quoted for scale; its runs may predate changes).
A run's score is its best validation loss over the budget (what find-steps would keep), validated 20
times, as the grid's runs are. Also reports the cost of `auto` (the sweep plus one run of the budget)
against one Prodigy run, in seconds measured here.

    python -m bench.lr_accuracy.alternatives [--problems a,b] [--workers 2]

Results: bench/results/lr_alternatives.json and .md; runs cached under bench/work/lr_accuracy/cache.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.lr_accuracy.problems import PROBLEMS  # noqa: E402
from bench.lr_accuracy.runs import _setup_process, add_common_arguments, cached, sweep_run, validated_run  # noqa: E402

from difftune.optim.optimizers import PRODIGY_AS_RECOMMENDED  # noqa: E402

SEEDS = (1, 2)
DADAPT = {"name": "dadapt_adam"}
CYCLES = 2
REPORTS = ("lr_accuracy.json", "lr_accuracy_flow.json", "lr_accuracy_more.json")
"""The find-lr sweeps and check runs the alternatives are compared with."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def variants(sweep: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Name → (train, optimizer) changes of each alternative for one seed's sweep."""
    # cyclic rises from lr_min in every cycle: the problem's warmup is its first rise
    cyclic = {"lr": sweep["lr_max"], "lr_min": sweep["lr_min"], "lr_scheduler": "cyclic", "lr_cycles": CYCLES,
              "lr_warmup_steps": 0, "lr_warmup_ratio": None}
    return {
        # find-lr's LR again, here: the same score as the report's check run, and its time next to the others'
        "find_lr": {"train": {"lr": float(f"{sweep['lr']:.4g}")}},
        "prodigy": {"train": {"lr": 1.0}, "optimizer": PRODIGY_AS_RECOMMENDED},
        "dadapt_adam": {"train": {"lr": 1.0}, "optimizer": DADAPT},
        "clr_triangular": {"train": {**cyclic, "cyclic_mode": "triangular"}},
        "clr_triangular2": {"train": {**cyclic, "cyclic_mode": "triangular2"}},
    }


@cached
def variant_run(problem_name: str, work: str, variant: str, changes: dict, seed: int) -> dict[str, Any]:
    """The problem's config with `changes`, trained for its budget, validated 20 times."""
    from difftune.config.loading import validate_config

    problem = PROBLEMS[problem_name]
    data = problem.config(Path(work))
    data["train"].update({"seed": seed, "max_steps": problem.steps, "lr_scheduler": "constant", **changes["train"]})
    if "optimizer" in changes:
        data["optimizer"] = dict(changes["optimizer"])
    data["output"]["dir"] = str(Path(work) / "runs" / f"{problem_name}-{variant}-s{seed}")
    config = validate_config(data, f"{problem_name} {variant}")
    return {"problem": problem_name, "variant": variant, "seed": seed, "changes": changes,
            **validated_run(config, problem.steps)}


def baselines(results: Path) -> dict[str, dict[str, Any]]:
    """Per problem: its sweeps (by seed) and check runs at find-lr's LR, from the lr_accuracy reports."""
    found = {}
    for name in REPORTS:
        path = results / name
        if not path.is_file():
            continue
        for problem, entry in json.loads(path.read_text())["problems"].items():
            sweeps = {s["seed"]: s for s in entry["sweeps"] if s.get("shape") == "log" and s.get("status") == "ok"}
            checks = {r["seed"]: r for r in entry["check_runs"]["runs"]}
            grid = entry["grid"]
            found[problem] = {"sweeps": sweeps, "checks": checks, "grid_best": min(grid["mean_best_val_loss"]),
                              "grid_best_lr": grid["lrs"][grid["mean_best_val_loss"].index(min(grid["mean_best_val_loss"]))]}
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    add_common_arguments(parser, ROOT)
    args = parser.parse_args(argv)
    _setup_process()
    work, results = Path(args.work), Path(args.results)
    base = baselines(results)
    names = [n for n in args.problems.split(",") if n in base]
    for name in names:
        PROBLEMS[name].prepare(work)
    started = time.perf_counter()
    pool = ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn"))
    runs = {}
    try:
        # find-lr once more per seed, by today's code and timed beside the runs it is compared with: its
        # LR and bounds (the stored report may predate changes to training), and auto's cost
        sweeps = {(name, seed): pool.submit(sweep_run, name, str(work), seed, "log",
                                            str(work / "cache" / name / f"alt-sweep-log-s{seed}.json"))
                  for name in names for seed in SEEDS}
        for (name, seed), job in sweeps.items():
            runs[(name, "sweep", seed)] = job.result()
            log(f"{name} s{seed}: find-lr recommends {runs[(name, 'sweep', seed)]['lr']}")
        jobs = {}
        for name in names:
            for seed in SEEDS:
                sweep = runs[(name, "sweep", seed)]
                if sweep.get("lr") is None:
                    continue
                for variant, changes in variants(sweep).items():
                    tag = "" if "optimizer" in changes else f"-lr{changes['train']['lr']:.4g}"  # LR-free: no sweep
                    cache = work / "cache" / name / f"alt-{variant}{tag}-s{seed}.json"
                    jobs[(name, variant, seed)] = pool.submit(variant_run, name, str(work), variant, changes, seed,
                                                              str(cache))
        for key, job in jobs.items():
            runs[key] = job.result()
            log(f"{key}: best {runs[key]['best_val_loss']:.5g} in {runs[key]['seconds']:.0f}s")
    finally:
        pool.shutdown()
    report = merged(results / "lr_alternatives.json", build_report(names, base, runs))
    report["wall_seconds"] = {**report.get("wall_seconds", {}), ",".join(names): time.perf_counter() - started}
    (results / "lr_alternatives.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / "lr_alternatives.md").write_text(format_table(report) + "\n")
    print(format_table(report))
    return 0


def merged(path: Path, report: dict[str, Any]) -> dict[str, Any]:
    """`report` with the problems of the report already at `path` that this run did not train, so a run
    of some problems adds to the results rather than replacing them (wall seconds are kept per run)."""
    if not path.is_file():
        return report
    old = json.loads(path.read_text())
    problems = {**{n: e for n, e in old["problems"].items() if n not in report["problems"]}, **report["problems"]}
    seconds = old.get("wall_seconds", {})
    if not isinstance(seconds, dict):  # one number, from a run of every problem before this was kept per run
        seconds = {",".join(old["problems"]): seconds}
    return {**summary(problems), "wall_seconds": seconds}


def summary(problems: dict[str, Any]) -> dict[str, Any]:
    wins = {v: [n for n, e in problems.items() if v in e["variants"] and e["variants"][v]["find_lr_better_by"] > 0]
            for v in ("prodigy", "dadapt_adam", "clr_triangular", "clr_triangular2")}
    return {"description": __doc__.split("\n\n")[0], "problems": problems,
            "find_lr_beats": {v: f"{len(w)}/{len(problems)}" for v, w in wins.items()}}


def build_report(names, base, runs) -> dict[str, Any]:
    problems = {}
    for name in names:
        checks = base[name]["checks"]
        here = [runs[(name, "find_lr", s)]["best_val_loss"] for s in SEEDS if (name, "find_lr", s) in runs]
        # compared with find-lr's LR trained here, by today's code (the report's check runs may predate it)
        find_lr = statistics.mean(here) if here else statistics.mean(r["best_val_loss"] for r in checks.values())
        entry = {"find_lr_lr": [r["lr"] for r in checks.values()], "find_lr_best": find_lr,
                 "find_lr_best_in_report": statistics.mean(r["best_val_loss"] for r in checks.values()),
                 "grid_best": base[name]["grid_best"], "grid_best_lr": base[name]["grid_best_lr"], "variants": {}}
        for variant in ("find_lr", "prodigy", "dadapt_adam", "clr_triangular", "clr_triangular2"):
            got = [runs[(name, variant, s)] for s in SEEDS if (name, variant, s) in runs]
            if not got:
                continue
            best = statistics.mean(r["best_val_loss"] for r in got)
            entry["variants"][variant] = {
                "best_val_loss": best, "per_seed": [r["best_val_loss"] for r in got],
                "diverged": sum(r["diverged"] for r in got), "seconds": statistics.mean(r["seconds"] for r in got),
                "find_lr_better_by": (best - find_lr) / find_lr if math.isfinite(best) else math.inf,
            }
        entry["find_lr_today"] = {seed: {k: runs[(name, "sweep", seed)].get(k) for k in ("lr", "lr_min", "lr_max", "lr_edge")}
                                  for seed in SEEDS if (name, "sweep", seed) in runs}
        sweep, own, prodigy = (runs.get((name, v, 1)) for v in ("sweep", "find_lr", "prodigy"))
        if sweep and own and prodigy:
            # auto = find-lr's sweep + one run of the budget at its LR (find-steps), timed in this benchmark
            entry["seconds"] = {"sweep": sweep["bench"]["seconds"], "run": own["seconds"], "prodigy": prodigy["seconds"]}
            entry["auto_cost_vs_prodigy"] = (sweep["bench"]["seconds"] + own["seconds"]) / prodigy["seconds"]
        problems[name] = entry
    return summary(problems)


def format_table(report: dict[str, Any]) -> str:
    lines = ["| problem | grid best | find-lr + own optimizer (report; here) | Prodigy | D-Adapt Adam | CLR triangular | "
             "CLR triangular2 | auto cost / Prodigy run |", "|---|---|---|---|---|---|---|---|"]
    for name, e in report["problems"].items():
        here = e["variants"].get("find_lr")
        cells = [name, f"{e['grid_best']:.5g}",
                 f"{e['find_lr_best_in_report']:.5g}; " + (f"{here['best_val_loss']:.5g}" if here else "n/a")]
        for v in ("prodigy", "dadapt_adam", "clr_triangular", "clr_triangular2"):
            r = e["variants"].get(v)
            cells.append("n/a" if r is None else
                         f"{r['best_val_loss']:.5g} ({r['find_lr_better_by']:+.1%})" + (" diverged" if r["diverged"] else ""))
        cells.append(f"{e['auto_cost_vs_prodigy']:.2f}x" if "auto_cost_vs_prodigy" in e else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("(+x%: the alternative's best validation loss is x% above find-lr's trained here, i.e. find-lr is "
                 "better; grid best and the report's check runs come from bench/results/lr_accuracy*.json)")
    lines += [f"find-lr beats {v} on {n} problems" for v, n in report["find_lr_beats"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
