"""Is find-lr's rule honest on problems it was not fitted on? (a benchmark analysis, no training)

Reads the sweeps and grids of bench/results/lr_accuracy*.json and scores candidate rules on every log
sweep: `edge/d` (the default rule's form, d = find_lr.edge_divisor) and `between/w`, the geometric
point a fraction w of the way from the stability edge down to `lr_max`, where the sweep's loss stops
falling (an adaptive divisor: the gap between the two differs by problem). Each rule is *fitted* on one
half of the problems (most sweeps in the 2% good band, then the smallest worst grid regret) and
*reported* on the other half, for two splits (problems in the order they were added, and alternating)
in both directions. A rule's grid regret is the grid's interpolated loss at its LR; an LR outside the
grid counts as not in band with unknown regret.

    python -m bench.lr_accuracy.rule_cv

Results: bench/results/lr_rule_cv.json and .md.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.lr_accuracy.analysis import score_lr  # noqa: E402

REPORTS = ("lr_accuracy.json", "lr_accuracy_flow.json", "lr_accuracy_more.json")
DIVISORS = (2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0)
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def rules() -> dict[str, Any]:
    """Rule name → function of a sweep's (lr_max, lr_edge) giving its LR."""
    found = {f"edge/{d:g}": (lambda lr_max, edge, d=d: edge / d) for d in DIVISORS}
    found.update({f"between/{w:g}": (lambda lr_max, edge, w=w: edge * (lr_max / edge) ** w) for w in FRACTIONS})
    return found


def load(results: Path) -> dict[str, dict[str, Any]]:
    """Problem → its grid and its usable log sweeps (those with both an edge and an lr_max)."""
    problems = {}
    for name in REPORTS:
        path = results / name
        if path.is_file():
            for problem, entry in json.loads(path.read_text())["problems"].items():
                sweeps = [s for s in entry["sweeps"] if s.get("shape") == "log" and s.get("lr_edge") and s.get("lr_max")]
                problems[problem] = {"grid": entry["grid"], "sweeps": sweeps}
    return problems


def score(rule, problems: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """In-band count and worst/median grid regret of one rule over the sweeps of `names`."""
    scored = [score_lr(rule(s["lr_max"], s["lr_edge"]), problems[n]["grid"]) for n in names for s in problems[n]["sweeps"]]
    regrets = sorted(r["regret"] if r["regret"] is not None else math.inf for r in scored)
    return {"in_band": sum(r["in_good_band"] for r in scored), "sweeps": len(scored),
            "worst_regret": regrets[-1] if regrets else None, "median_regret": regrets[len(regrets) // 2] if regrets else None}


def fit(problems: dict[str, Any], names: list[str]) -> str:
    candidates = rules()
    return min(candidates, key=lambda r: (-(s := score(candidates[r], problems, names))["in_band"], s["worst_regret"]))


def splits(names: list[str]) -> dict[str, tuple[list[str], list[str]]]:
    half = len(names) // 2
    by_order = (names[:half], names[half:])
    alternating = (names[0::2], names[1::2])
    return {"order: first half": by_order, "order: second half": by_order[::-1],
            "alternating: even": alternating, "alternating: odd": alternating[::-1]}


def main() -> int:
    results = ROOT / "bench" / "results"
    problems = load(results)
    names = list(problems)
    candidates = rules()
    report: dict[str, Any] = {"description": __doc__.split("\n\n")[0], "problems": names,
                              "all_problems": {r: score(f, problems, names) for r, f in candidates.items()}, "folds": []}
    for split, (fit_on, report_on) in splits(names).items():
        chosen = fit(problems, fit_on)
        report["folds"].append({
            "split": split, "fitted_on": fit_on, "reported_on": report_on, "chosen": chosen,
            "fitted": score(candidates[chosen], problems, fit_on),
            "held_out": score(candidates[chosen], problems, report_on),
            "default_held_out": score(candidates["edge/4.5"], problems, report_on),
        })
    (results / "lr_rule_cv.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / "lr_rule_cv.md").write_text(format_table(report) + "\n")
    print(format_table(report))
    return 0


def _pct(value: float | None) -> str:
    return "n/a" if value is None else ("outside the grid" if math.isinf(value) else f"{value:+.1%}")


def format_table(report: dict[str, Any]) -> str:
    lines = [f"Problems: {', '.join(report['problems'])}", "",
             "| rule | in the good band (all sweeps) | median grid regret | worst grid regret |", "|---|---|---|---|"]
    for rule, s in report["all_problems"].items():
        lines.append(f"| {rule} | {s['in_band']}/{s['sweeps']} | {_pct(s['median_regret'])} | {_pct(s['worst_regret'])} |")
    lines += ["", "| fitted on | chosen | fitted: in band | held out: in band | held out: worst regret | "
              "edge/4.5 held out: in band | edge/4.5 held out: worst |", "|---|---|---|---|---|---|---|"]
    for f in report["folds"]:
        lines.append(f"| {', '.join(f['fitted_on'])} | {f['chosen']} | {f['fitted']['in_band']}/{f['fitted']['sweeps']} | "
                     f"{f['held_out']['in_band']}/{f['held_out']['sweeps']} | {_pct(f['held_out']['worst_regret'])} | "
                     f"{f['default_held_out']['in_band']}/{f['default_held_out']['sweeps']} | "
                     f"{_pct(f['default_held_out']['worst_regret'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
