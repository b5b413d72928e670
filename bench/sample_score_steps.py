"""Does the step find-steps picks by validation loss also make the best-looking samples? (a benchmark)

On the demo's setup (the tiny model learning the bundled digits from scratch, difftune/examples/demo.toml),
find-steps trains at the demo's LR and validates 25 times; with digit prompts it samples at every
validation too, and a digit classifier reads each sample (`sample_digit_score`, reporting/digit_score.py).
Here the prompts are 30 (three per digit, seeds differ), so the score moves in steps of 1/30. Reported:
find-steps' best step by validation loss, the step with the best sample score, and whether they agree
within one validation interval or 5 points of score, as issue 17 asks.

    python bench/sample_score_steps.py [--out bench/work/sample_score_steps] [--steps 2000]

Results: bench/results/sample_score_steps.json and .md, and the find-steps plot (loss and score) copied
to bench/results/sample_score_steps.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS_PER_DIGIT = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "work" / "sample_score_steps"))
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--steps", type=int, default=None, help="find-steps' budget (default: the demo's max_steps)")
    args = parser.parse_args(argv)

    from difftune.config.loading import validate_config
    from difftune.demo import DIGIT_WORDS, demo_config_text, export_digits, prepare_base_model
    from difftune.tuning.step_finder import find_steps

    out, results = Path(args.out), Path(args.results)
    data_dir = out / "data" / "1_digits"
    if not data_dir.is_dir():
        export_digits(data_dir)
    base = prepare_base_model(out / "base-model", data_dir)
    data = tomllib.loads(demo_config_text())
    data["model"]["path"] = str(base)
    data["data"]["train_dir"] = str(out / "data")
    data["output"] = {**data.get("output", {}), "dir": str(out / "run"), "overwrite": True}
    data["sample"]["prompts"] = [f"a handwritten digit {w}" for w in DIGIT_WORDS for _ in range(PROMPTS_PER_DIGIT)]
    if args.steps:
        data["train"]["max_steps"] = args.steps
    config = validate_config(data, "sample score benchmark")
    started = time.perf_counter()
    result = find_steps(config, show_progress=False)
    seconds = time.perf_counter() - started

    curve = [row for row in result["curve"] if row.get("sample_digit_score") is not None]
    best_score = max(row["sample_digit_score"] for row in curve)
    best_score_steps = [row["step"] for row in curve if row["sample_digit_score"] == best_score]
    at_best = next(row for row in result["curve"] if row["step"] == result["best_step"])
    interval = result["every_n_steps"]
    report = {
        "description": __doc__.split("\n\n")[0],
        "prompts": len(data["sample"]["prompts"]), "lr": result["lr"], "every_n_steps": interval,
        "best_step_by_val_loss": result["best_step"], "val_loss_at_best": result["best_loss"],
        "sample_score_at_best_step": at_best.get("sample_digit_score"),
        "best_sample_score": best_score, "steps_with_best_sample_score": best_score_steps,
        "within_one_interval": any(abs(s - result["best_step"]) <= interval for s in best_score_steps),
        "within_5_points": best_score - (at_best.get("sample_digit_score") or 0.0) <= 0.05,
        "early_stop": result["early_stop"], "stopped_at": result["stopped_at"],
        "curve": [{k: row.get(k) for k in ("step", "val_loss", "sample_digit_score")} for row in result["curve"]],
        "seconds": seconds,
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / "sample_score_steps.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.copyfile(result["files"]["plot"], results / "sample_score_steps.png")
    lines = [
        f"find-steps on the demo (lr {report['lr']:g}, validation and {report['prompts']} samples every "
        f"{interval} steps, {seconds:.0f}s):",
        "",
        "| step | validation loss | sample digit score |", "|---:|---:|---:|",
        *[f"| {r['step']} | {r['val_loss']:.4f} | {r['sample_digit_score'] if r['sample_digit_score'] is None else round(r['sample_digit_score'], 3)} |"
          for r in report["curve"]],
        "",
        f"best step by validation loss: {report['best_step_by_val_loss']} (loss {report['val_loss_at_best']:.4f}, "
        f"sample score {report['sample_score_at_best_step']:.3f})",
        f"best sample score: {best_score:.3f} at step(s) {', '.join(map(str, best_score_steps))}",
        f"within one validation interval: {report['within_one_interval']}; within 5 points: {report['within_5_points']}",
        f"early stop: {report['early_stop'] or 'none'} (stopped at step {report['stopped_at']})",
    ]
    (results / "sample_score_steps.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
