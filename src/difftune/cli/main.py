"""`difftune` command line. Parsing and error reporting only; the work happens in the package."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

EXIT_USER_ERROR = 2


def _quiet_libraries() -> None:
    """Library chatter (deprecations, optional-kernel notices) hides our own progress and errors."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU-kernel notice on import
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _add_config_args(parser: argparse.ArgumentParser, config_required: bool = True) -> None:
    parser.add_argument("config", nargs=None if config_required else "?", help="config file (.toml, .yaml, .json)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=1e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difftune", description="Fine-tune diffusion models and find their LR and steps.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("train", help="train a model as configured")
    _add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last saved state")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("demo", help="train the tiny built-in model on handwritten digits (CPU, minutes)")
    p.add_argument("--out", default="demo-out", help="folder for the demo's data and run (default: demo-out)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("doctor", help="check config and dataset, print the plan, train nothing")
    _add_config_args(p)
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")

    p = sub.add_parser("schedule", help="plot the LR schedule of a config (no model is loaded)")
    _add_config_args(p)
    p.add_argument("--out", default=None, help="PNG path (default: <output.dir>/plots/schedule.png)")
    p.add_argument("--steps", type=int, default=None, help="total steps (default: from the dataset plan, else max_steps)")
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from difftune import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return EXIT_USER_ERROR
    from difftune.config.loading import ConfigError
    from difftune.data.records import DatasetError
    from difftune.models.loading import ModelLoadError
    from difftune.training.loop import TrainingDiverged

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DatasetError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; continue with --resume RUN_DIR from the last saved checkpoint", file=sys.stderr)
        return 130


def cmd_train(args) -> int:
    from difftune.config.loading import load_config
    from difftune.training.loop import train

    config = load_config(args.config, args.overrides)
    summary = train(config, resume=args.resume, show_progress=not args.no_progress)
    _print_summary(summary, Path(args.resume or config.output.dir))
    return 0


def cmd_demo(args) -> int:
    import tomllib

    from difftune.config.loading import apply_overrides, validate_config
    from difftune.demo import demo_config_text, export_digits, prepare_base_model
    from difftune.training.loop import train

    out = Path(args.out)
    data_dir = out / "data" / "1_digits"
    if not data_dir.is_dir():
        count = export_digits(data_dir)
        print(f"exported {count} handwritten digits to {data_dir}")
    base = out / "base-model"
    if not (base / "model_index.json").is_file():
        print(f"fitting the tiny model's VAE to the digits (once) → {base}")
    prepare_base_model(base, data_dir)
    data = tomllib.loads(demo_config_text())
    data["model"]["path"] = str(base)
    data["data"]["train_dir"] = str(out / "data")
    data.setdefault("output", {})["dir"] = str(out / "run")
    data["output"]["overwrite"] = True
    apply_overrides(data, args.overrides)
    config = validate_config(data, "difftune demo config")
    summary = train(config, show_progress=not args.no_progress)
    _print_summary(summary, Path(config.output.dir))
    return 0


def cmd_doctor(args) -> int:
    from difftune.config.loading import load_config
    from difftune.doctor import diagnose, format_report

    config = load_config(args.config, args.overrides)
    report = diagnose(config)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def cmd_schedule(args) -> int:
    from difftune.config.loading import load_config
    from difftune.optim.preview import format_schedule_table, write_schedule_preview

    config = load_config(args.config, args.overrides)
    steps = args.steps
    if steps is None:
        if config.train.max_steps is not None or not config.data.train_dir:
            steps = config.train.max_steps or 1000
        else:
            from difftune.training.plan import make_plan

            steps = make_plan(config).total_steps
    out = Path(args.out) if args.out else Path(config.output.dir) / "plots" / "schedule.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    table = write_schedule_preview(config, out, steps)
    print(format_schedule_table(table))
    print(f"plot: {out}")
    return 0


def _print_summary(summary: dict, run_dir: Path) -> None:
    def fmt(v):
        return "n/a" if v is None else f"{v:.5f}"

    print(
        f"\ndone: {summary['steps']} steps in {summary['wall_seconds']:.1f}s "
        f"({summary['steps_per_second'] or 0:.2f} steps/s)\n"
        f"validation loss: first {fmt(summary['first_val_loss'])}, final {fmt(summary['final_val_loss'])}, "
        f"best {fmt(summary['best_val_loss'])} at step {summary['best_val_step']}\n"
        f"run directory: {run_dir}  (plots/, samples/, checkpoints/, metrics.jsonl, summary.json)"
    )


COMMANDS = {"train": cmd_train, "demo": cmd_demo, "doctor": cmd_doctor, "schedule": cmd_schedule}


if __name__ == "__main__":
    sys.exit(main())
