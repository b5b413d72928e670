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


def positive_int(text: str) -> int:
    """argparse type for counts (steps, pixels): a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


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
    p.add_argument("--steps", type=positive_int, default=None, help="total steps (default: from the dataset plan, else max_steps)")
    _add_lora_commands(sub)
    _add_tuning_commands(sub)
    return parser


def _add_tuning_commands(sub) -> None:
    """find-lr / find-steps / auto: the LR and the step count, found on the configured setup."""
    p = sub.add_parser("find-lr", help="LR range test on the configured setup: bounds and a recommended LR")
    _add_config_args(p)
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON here")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("find-steps", help="train at a constant LR with early stopping: the best step count")
    _add_config_args(p)
    p.add_argument("--lr", type=float, default=None, help="the constant LR (default: train.lr of the config)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON here")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("auto", help="find-lr, then find-steps at its LR, then the final model and report.html")
    _add_config_args(p)
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON here")
    p.add_argument("--no-progress", action="store_true")


def _add_lora_commands(sub) -> None:
    """convert / merge / sample: LoRA files and images outside a training run."""
    p = sub.add_parser("convert", help="rewrite a LoRA file in the kohya (ComfyUI/A1111) or diffusers layout")
    p.add_argument("input", help="LoRA .safetensors (kohya or diffusers layout)")
    p.add_argument("output", help="where to write the converted .safetensors")
    p.add_argument("--to", required=True, choices=["kohya", "diffusers"], help="target layout")
    p.add_argument("--model", default=None, help="model whose layer names to use (default: SD 1.x/2.x and tiny-sd)")

    p = sub.add_parser("merge", help="bake a LoRA-family file into a model and save the full model")
    p.add_argument("base", help="model: built-in name, diffusers folder or single checkpoint file")
    p.add_argument("lora", help="LoRA-family .safetensors (kohya or diffusers layout)")
    p.add_argument("output", help="a .safetensors path (one original-layout checkpoint) or a folder (diffusers)")
    p.add_argument("--scale", type=float, default=1.0, help="strength of the LoRA (default 1.0)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                   help="saved precision (default: fp16 for a .safetensors file, fp32 for a folder)")

    p = sub.add_parser("sample", help="generate images from a model, optionally with a LoRA (training samples' pipeline)")
    p.add_argument("model", help="model: built-in name, diffusers folder or single checkpoint file")
    p.add_argument("--prompt", dest="prompts", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--lora", default=None, help="LoRA-family .safetensors to apply")
    p.add_argument("--scale", type=float, default=1.0, help="LoRA strength (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed + i")
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--cfg-scale", type=float, default=7.0)
    p.add_argument("--sampler", default="euler", choices=["euler", "euler_a", "ddim", "dpmpp_2m", "ddpm"])
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--width", type=positive_int, default=None)
    p.add_argument("--height", type=positive_int, default=None)
    p.add_argument("--clip-skip", type=int, default=1)
    p.add_argument("--out", default="sample.png", help="PNG path (several prompts: a grid here plus -N files)")


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
    from difftune.errors import TrainingDiverged, UserError

    try:
        return COMMANDS[args.command](args)
    except UserError as e:
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
    from difftune.doctor import advice
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
    for warning in advice(config, steps):  # the same advice doctor gives
        print(f"warning: {warning}")
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


def cmd_convert(args) -> int:
    from difftune.network.tools import convert_file

    done = convert_file(args.input, args.output, args.to, args.model)
    print(f"{args.input} ({done['from']}) -> {done['target']} ({done['to']}, {done['tensors']} tensors)")
    return 0


def cmd_merge(args) -> int:
    from difftune.network.tools import merge_into_model

    done = merge_into_model(args.base, args.lora, args.scale, args.output, args.precision)
    print(f"merged {done['layers']} layers of {args.lora} at scale {done['scale']:g} into {args.base} -> {done['target']}")
    return 0


def cmd_sample(args) -> int:
    from difftune.generate import generate

    written = generate(args.model, args.prompts, args.out, lora=args.lora, scale=args.scale, seed=args.seed,
                       steps=args.steps, cfg_scale=args.cfg_scale, sampler=args.sampler,
                       negative_prompt=args.negative_prompt, width=args.width, height=args.height,
                       clip_skip=args.clip_skip)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


COMMANDS = {"train": cmd_train, "demo": cmd_demo, "doctor": cmd_doctor, "schedule": cmd_schedule}
COMMANDS.update({"convert": cmd_convert, "merge": cmd_merge, "sample": cmd_sample})


def _write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def cmd_find_lr(args) -> int:
    from difftune.config.loading import load_config
    from difftune.tuning.lr_finder import find_lr, format_result

    result = find_lr(load_config(args.config, args.overrides), show_progress=not args.no_progress)
    print(format_result(result))
    _write_json(args.json, result)
    return 0 if result["lr"] is not None else 1


def cmd_find_steps(args) -> int:
    from difftune.config.loading import load_config
    from difftune.tuning.step_finder import find_steps, format_result

    result = find_steps(load_config(args.config, args.overrides), args.lr, show_progress=not args.no_progress)
    print(format_result(result))
    _write_json(args.json, result)
    return 0 if result["best_step"] else 1  # None: nothing measured; 0: the untrained model was best


def cmd_auto(args) -> int:
    from difftune.config.loading import load_config
    from difftune.tuning.auto import auto, format_result

    result = auto(load_config(args.config, args.overrides), show_progress=not args.no_progress)
    print(format_result(result))
    _write_json(args.json, result)
    return 0 if result["status"] == "ok" else 1


COMMANDS.update({"find-lr": cmd_find_lr, "find-steps": cmd_find_steps, "auto": cmd_auto})


if __name__ == "__main__":
    sys.exit(main())
