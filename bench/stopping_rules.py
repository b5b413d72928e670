"""Which early-stopping rule should find-steps use? Replay the rules on measured validation curves.

The curves are the constant-LR runs of `bench/lr_accuracy` (every grid LR x seed, and the check runs at
the LRs find-lr recommends): 20 validations over 150-200 steps on five problems, cached as JSON under
bench/work/lr_accuracy/cache/ (run `python -m bench.lr_accuracy` first). Each rule is fed the curve one
validation at a time, exactly as `difftune find-steps` feeds `EarlyStopping`; where it stops, the kept
checkpoint is the best seen so far. Per rule this reports:

- regret: that checkpoint's validation loss over the curve's minimum within the whole budget, minus 1;
- how often the rule stopped before the budget, and the share of the budget it used.

Usage: python bench/stopping_rules.py [--work bench/work/lr_accuracy] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from difftune.tuning.curve import EarlyStopping

RULES = {
    # name: EarlyStopping(patience, gl_alpha, min_delta, gl_consecutive); 0 / None turns a criterion off
    "GL5 + patience 5 (Prechelt as published; difftune before this bench)": (5, 5.0, 1),
    "GL5, 2 in a row + patience 5": (5, 5.0, 2),
    "GL5, 3 in a row + patience 5": (5, 5.0, 3),
    "GL10 + patience 5": (5, 10.0, 1),
    "GL50 + patience 8": (8, 50.0, 1),
    "patience 5": (5, None, 1),
    "patience 8 (difftune's default)": (8, None, 1),
    "patience 10": (10, None, 1),
}


def load_curves(work: Path) -> list[tuple[str, str, list[tuple[int, float]]]]:
    """(problem, run name, [(step, val_loss)]) of every cached constant-LR run."""
    curves = []
    for path in sorted((work / "cache").glob("*/*.json")):
        if not path.name.startswith(("grid-", "check-")):
            continue  # sweeps have no constant-LR validation curve
        run = json.loads(path.read_text())
        curves.append((path.parent.name, path.stem, [(int(s), float(v)) for s, v in run["curve"]]))
    return curves


def replay(curve: list[tuple[int, float]], patience: int | None, gl_alpha: float | None, in_a_row: int) -> dict:
    stopper = EarlyStopping(patience, gl_alpha, 0.0, in_a_row)
    best_loss, used = math.inf, len(curve)
    for i, (_, loss) in enumerate(curve):
        if math.isfinite(loss):
            best_loss = min(best_loss, loss)
        if stopper.update(i, loss):
            used = i + 1
            break
    floor = min(v for _, v in curve if math.isfinite(v))
    return {"regret": best_loss / floor - 1.0, "stopped": used < len(curve), "budget_used": used / len(curve)}


def summarise(results: list[dict]) -> dict:
    regrets = sorted(r["regret"] for r in results)
    return {
        "runs": len(results),
        "median_regret_pct": 100 * statistics.median(regrets),
        "p90_regret_pct": 100 * regrets[int(0.9 * (len(regrets) - 1))],
        "worst_regret_pct": 100 * regrets[-1],
        "runs_over_2pct": sum(r > 0.02 for r in regrets),
        "stopped_early": sum(r["stopped"] for r in results),
        "mean_budget_used_pct": 100 * statistics.mean(r["budget_used"] for r in results),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench/work/lr_accuracy")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    curves = [c for c in load_curves(Path(args.work)) if any(math.isfinite(v) for _, v in c[2])]
    if not curves:
        sys.exit(f"no cached runs under {args.work}/cache: run `python -m bench.lr_accuracy` first")
    groups = {"all runs": curves, "check runs (at find-lr's LRs)": [c for c in curves if c[1].startswith("check-")]}
    table: dict[str, dict[str, dict]] = {}
    for group, members in groups.items():
        table[group] = {name: summarise([replay(c[2], *spec) for c in members]) for name, spec in RULES.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"what": __doc__.split("\n\n")[0], "problems": sorted({c[0] for c in curves}), "results": table}
    (out / "stopping_rules.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Early-stopping rules replayed on measured validation curves (bench/stopping_rules.py)", ""]
    for group, rows in table.items():
        lines += [f"### {group}: {next(iter(rows.values()))['runs']} runs", "",
                  "| rule | median regret | p90 regret | worst regret | runs > 2% | stopped early | budget used |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, s in rows.items():
            lines.append(f"| {name} | {s['median_regret_pct']:.2f}% | {s['p90_regret_pct']:.2f}% | "
                         f"{s['worst_regret_pct']:.1f}% | {s['runs_over_2pct']} | {s['stopped_early']} | "
                         f"{s['mean_budget_used_pct']:.0f}% |")
        lines.append("")
    (out / "stopping_rules.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
