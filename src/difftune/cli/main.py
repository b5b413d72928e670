"""`difftune` command line. Parsing and error reporting only; the work happens in the package."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USER_ERROR = 2


def positive_int(text: str) -> int:
    """argparse type for counts (steps, pixels): a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


HELP_WIDTH = 78
"""Width the description and epilog paragraphs are wrapped to (argparse keeps them as written)."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs keep their paragraphs and lists; option help is wrapped as usual."""

    def __init__(self, prog, **kwargs):
        kwargs.setdefault("max_help_position", 30)
        super().__init__(prog, **kwargs)


def _text(*blocks: str) -> str:
    """Help paragraphs separated by blank lines: a block starting with two spaces (a list, a file
    listing) is kept as written, any other block is wrapped to HELP_WIDTH."""
    import textwrap

    return "\n\n".join(
        b if b.startswith("  ") else textwrap.fill(" ".join(b.split()), HELP_WIDTH, break_on_hyphens=False)
        for b in blocks
    )


def _files(*rows: tuple[str, str]) -> str:
    """A listing of (file, what it holds), the text wrapped beside the names."""
    import textwrap

    column = max(len(name) for name, _ in rows) + 4
    lines = []
    for name, text in rows:
        wrapped = textwrap.wrap(text, HELP_WIDTH - column, break_on_hyphens=False)
        lines.append(f"  {name:<{column - 2}}{wrapped[0]}")
        lines += [" " * column + line for line in wrapped[1:]]
    return "\n".join(lines)


def _toml_value(value) -> str:
    """A default as it would be written in a TOML config (None: the key is unset)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _config_keys(section: str, schema) -> str:
    """Every key of one config section with its default and description, read from the schema (so
    the schema stays the one place each fact lives)."""
    import textwrap
    from typing import Literal, get_args, get_origin

    lines = [f"config keys ([{section}] in the config file, or --set {section}.KEY=VALUE):"]
    for name, field in schema.model_fields.items():
        facts = f"default: {_toml_value(field.get_default(call_default_factory=True))}"
        if get_origin(field.annotation) is Literal:
            facts += "; one of: " + ", ".join(str(v) for v in get_args(field.annotation))
        lines.append(f"  {section}.{name}  ({facts})")
        lines += textwrap.wrap(field.description or "", HELP_WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6,
                               break_on_hyphens=False)
    return "\n".join(lines)


def _sub(sub, name: str, help: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=_HelpFormatter)


def _add_config_args(parser: argparse.ArgumentParser, config_required: bool = True) -> None:
    parser.add_argument(
        "config", nargs=None if config_required else "?", metavar="CONFIG",
        help="config file (.toml, .yaml, .yml or .json); every key it leaves out takes its default",
    )
    _add_set_arg(parser, "the config")


def _add_set_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a key of {what}, e.g. --set train.lr=1e-4; the value is read as TOML (1e-4, true, "
        "[1, 2], \"x\"), else as a string; repeatable, later ones win (default: none)",
    )


def _add_progress_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-progress", action="store_true",
        help="no progress bar (default: a bar on stderr with step, it/s, ETA, loss and LR; "
        "a line every 10 s when stderr is not a terminal)",
    )


def _add_json_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", metavar="PATH", default=None,
                        help=f"also write {what} as JSON to PATH (default: not written)")


RUN_DIR_FILES = (
    ("config.resolved.toml", "every setting, defaults filled in (reloads to the same config)"),
    ("metrics.jsonl", "one JSON object per optimizer step: step, epoch, lr, loss; val_loss and stable_train_loss "
     "on validation steps (step 0: the untrained baseline)"),
    ("summary.json", "first/final/best val_loss with their steps, steps/s, wall time, peak memory, model and "
     "network facts, the config"),
    ("tensorboard/", "the same metrics for TensorBoard (output.tensorboard)"),
    ("plots/", "loss.png (train, EMA, validation), lr.png"),
    ("samples/", "step-NNNNNN.png grids of sample.prompts, a fixed seed per prompt"),
    ("checkpoints/", "step-NNNNNN/ and final/: the export (a diffusers folder and/or model.safetensors for a full "
     "fine-tune, <name>.safetensors for a LoRA-family network) plus training_state/ for --resume; best/ with "
     "output.save_best; each save's manifest.json lists the size and sha256 of its files; latest.json "
     "names the newest resumable save"),
    (".difftune.lock", "held while a process uses the directory: a second run on it is refused"),
)

EXIT_CODES = """\
exit status: 0 done, 1 training diverged or the command found no answer (find-lr,
find-steps, auto), 2 a usage, config, data or model problem (the message says
what and where), 130 interrupted."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difftune", formatter_class=_HelpFormatter,
        description=_text(
            "Fine-tune Stable Diffusion 1.x/2.x, SDXL, Flux.1 and SD3/3.5 models (full fine-tunes and the LoRA family) and find their "
            "learning rate and step count on a deterministic validation loss.",
            "A run is described by one config file (TOML, YAML or JSON); `--set section.key=value` overrides "
            "any key. `difftune COMMAND --help` says what a command reads and what it writes where.",
        ),
        epilog=EXIT_CODES,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    p = _sub(sub, "train", "train a model as configured", _text(
        "Train as the config says: a full fine-tune, a LoRA-family network when network.type is set, or "
        "textual-inversion vectors (network.type = 'textual_inversion'; network.pivotal = true with a LoRA "
        "type: both; the export is then <token>.safetensors, the embedding file A1111/Forge and ComfyUI load). "
        "Reads the config, the model at model.path (a built-in name, a diffusers folder or a single "
        ".safetensors/.ckpt checkpoint; nothing is downloaded) and the captioned images in data.train_dir "
        "(and data.val_dir). Config and dataset problems are reported, every bad file listed, before the "
        "model loads.",
        "Writes the run directory output.dir:",
        _files(*RUN_DIR_FILES),
        "A new run refuses an output.dir that already holds one (metrics.jsonl) unless output.overwrite = "
        "true, and any run refuses a directory another live process is using. Saves are written to a "
        "temporary folder and renamed into place (leftovers of an interrupted save are removed on the next "
        "start); output.save_last_n prunes old ones.",
        "--resume RUN_DIR continues the run in RUN_DIR (which replaces output.dir) from its newest intact "
        "save with training state (each save is checked against its manifest; broken newer ones are named "
        "and skipped), bit for bit as if it had not stopped. Only the run length (train.max_steps, "
        "train.max_epochs), output.*, sample.*, validation.every_n_* and data.num_workers may differ from "
        "the run's config.resolved.toml; pass that file as CONFIG to resume exactly.",
    ))
    _add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR from its last saved state (default: start a new run in output.dir)")
    _add_progress_arg(p)

    p = _sub(sub, "demo", "train the tiny built-in model on handwritten digits (CPU, minutes)", _text(
        "The embedded default, to see difftune work without a model or a dataset: trains the built-in "
        "tiny model on scikit-learn's 1,797 handwritten digits on the CPU in a few minutes, with "
        "validation, sample grids and plots. Nothing is downloaded.",
        "Writes under --out:",
        _files(
            ("data/1_digits/", "the digits as 32-px PNGs with captions (\"a handwritten digit seven\"), exported "
             "on the first call"),
            ("base-model/", "the tiny model as a diffusers folder, its VAE fitted to the digits once (~20 s) so "
             "the samples are readable"),
            ("run/", "a complete run directory (see `difftune train --help`), replaced on every call"),
        ),
        "The config is difftune/examples/demo.toml with data.train_dir and output.dir filled in; "
        "--set changes any key of it. `difftune auto <out>/run/config.resolved.toml` then tunes the same "
        "setup.",
    ))
    p.add_argument("--out", default="demo-out", metavar="DIR", help="folder for the demo's data, base model and run (default: demo-out)")
    _add_set_arg(p, "the demo config")
    _add_progress_arg(p)

    p = _sub(sub, "doctor", "check config and dataset, print the plan, train nothing", _text(
        "Check a config and its dataset without training or loading model weights, and print the plan "
        "training would follow: images per folder with their repeats, train and validation images, samples "
        "per epoch, effective batch size, steps per epoch, epochs, total steps, the effective learning rates, "
        "and for a LoRA-family network its trainable parameters and file size (counted on a weightless "
        "copy of the architecture). Warnings from the optimizer and schedule catalogue follow.",
        "Every problem is listed at once: config keys with the file, the key, the value and what is valid; "
        "each unreadable image, missing caption, unsupported format or empty repeat folder (exit status 2).",
        "Writes nothing (not even output.dir) unless --json is given.",
    ))
    _add_config_args(p)
    _add_json_arg(p, "the report (plan, warnings, network facts)")

    p = _sub(sub, "schedule", "plot the LR schedule of a config (no model is loaded)", _text(
        "Plot the learning rate of every parameter group (denoiser, text_encoder, text_encoder_2: the parts it trains) at every optimizer step of the "
        "run, computed from the config alone: no model is loaded. Prints a table (first, peak and final LR "
        "per group, warmup end, decay end, notes on optimizers that set their own step size) and the "
        "optimizer/schedule warnings doctor gives.",
        "The step count is --steps, else train.max_steps, else the total steps of the dataset plan (which "
        "scans data.train_dir), else 1000 when there is neither.",
        "Writes only the PNG (--out).",
    ))
    _add_config_args(p)
    p.add_argument("--out", default=None, metavar="PNG", help="where to write the plot (default: <output.dir>/plots/schedule.png)")
    p.add_argument("--steps", type=positive_int, default=None, metavar="N",
                   help="total optimizer steps to plot (default: train.max_steps, else the dataset plan's total, else 1000)")
    _add_tuning_commands(sub)
    _add_lora_commands(sub)
    return parser


def _add_tuning_commands(sub) -> None:
    """find-lr / find-steps / auto: the LR and the step count, found on the configured setup."""
    from difftune.config.schema import AutoConfig, FindLRConfig, FindStepsConfig

    untouched = ("Nothing of yours is touched: models and images are only read, and a run already in "
                 "output.dir stays as it is; the command's folder is replaced on every call.")
    p = _sub(sub, "find-lr", "LR range test on the configured setup: bounds and a recommended LR", _text(
        "An LR range test on your exact setup: the model, network, optimizer, batch, precision and data "
        "order `difftune train` would use, trained while the LR climbs a ramp (log-spaced stairs by default) "
        "from find_lr.start_lr to find_lr.end_lr (defaults: the optimizer's usual range, widened 10x, for a "
        "full fine-tune or a LoRA). After every find_lr.steps_per_point steps a fixed probe is measured "
        "(held-out images x fixed noise x stratified timesteps, find_lr.probe), so two points differ only "
        "by what training did. The sweep stops once the loss exceeds find_lr.stop_factor times its best; "
        "with find_lr.extend it goes past end_lr (up to 100x) until it does.",
        "It prints and saves lr_min (where the loss starts to fall), lr_max (where the fall ends), lr_edge "
        "(where it diverged), the recommended constant lr (find_lr.rule; the default rule is lr_edge / "
        "find_lr.edge_divisor) with a 10/50/90% band from a bootstrap over the probe items, the other rules' "
        "picks, a verdict in plain words when the curve cannot be read, and the cost. Exit status 1: no LR "
        "could be recommended (the verdict says why). Optimizers that ignore train.lr (adaptive Adafactor) "
        "are refused.",
        untouched + " Results go to <output.dir>/find-lr/:",
        _files(
            ("find_lr.json", "the result: lr, lr_min, lr_max, lr_edge, lr_band, rule, status, verdict, "
             "suggestions, curve (one entry per point), sweep, cost, files"),
            ("curve.csv", "one row per point: point, lr, step, train_loss, score, val_probe_loss and/or "
             "train_probe_loss, smoothed"),
            ("find_lr.png", "probe loss against LR, the bounds and the recommendation marked"),
            ("probe_losses.npz", "every probe item's loss at every point, to re-read the sweep with another "
             "rule without re-running it"),
            ("config.resolved.toml", "the config the sweep ran with"),
        ),
        "Train at the result with train.lr_from = \"<output.dir>/find-lr/find_lr.json\" (with "
        "train.lr_scheduler = \"cyclic\" it cycles between lr_min and lr_max). Method and benchmark: "
        "docs/tuning.md.",
    ), epilog=_config_keys("find_lr", FindLRConfig))
    _add_config_args(p)
    p.add_argument("--group", choices=["all", "denoiser", "text_encoder", "text_encoder_2", "embedding"], default=None,
                   help="whose LR to sweep (find_lr.group; default: the config's, 'all'): e.g. text_encoder sweeps "
                        "train.text_encoder_lr with the UNet held at train.lr (set it to its found value)")
    _add_json_arg(p, "the result (the content of find_lr.json)")
    _add_progress_arg(p)

    p = _sub(sub, "find-steps", "train at a constant LR with early stopping: the best step count", _text(
        "Train your setup at a constant LR (--lr, else train.lr; the schedule becomes constant, warmup is "
        "kept) for up to find_steps.max_steps steps, measure the deterministic validation loss every "
        "find_steps.every_n_steps steps, keep the weights with the lowest one, and stop early after "
        "find_steps.patience validations without a new best (or, with find_steps.gl_alpha set, by Prechelt's "
        "generalization loss). "
        "Needs validation images: data.val_split > 0 or data.val_dir.",
        "It prints and saves the best step and its validation loss, the band of steps within "
        "find_steps.margin of the best, the earliest step as good, and why it stopped. Training is "
        "deterministic, so a fresh run to the best step with the same settings reproduces the best "
        "checkpoint bit for bit. Exit status 1: no step improved on the untrained model.",
        untouched + " Results go to <output.dir>/find-steps/, a complete run directory "
        "(see `difftune train --help`) with:",
        _files(
            ("find_steps.json", "the result: lr, best_step, best_loss, step_band, earliest_good_step, verdict, "
             "early_stop, stopped_at, curve, best_checkpoint, cost, files"),
            ("find_steps.png", "validation loss against step, the best step and the band marked"),
            ("checkpoints/best/", "the export of the best weights"),
            ("checkpoints/final/", "the weights where the run stopped"),
        ),
        "Use the step count as train.max_steps with the same LR, or take checkpoints/best as it is.",
    ), epilog=_config_keys("find_steps", FindStepsConfig))
    _add_config_args(p)
    p.add_argument("--lr", type=float, default=None, metavar="X", help="the constant LR to train at (default: train.lr of the config)")
    _add_json_arg(p, "the result (the content of find_steps.json)")
    _add_progress_arg(p)

    p = _sub(sub, "auto", "find-lr, then find-steps at its LR, then the final model and report.html", _text(
        "The whole search in one command: 1. find-lr on your setup (see `difftune find-lr --help`); "
        "2. find-steps at its recommended LR (see `difftune find-steps --help`); 3. the final model; "
        "4. a report. It stops early, with the reason and exit status 1, when find-lr recommends no LR or "
        "find-steps finds no step better than the untrained model.",
        "By default (auto.final_run = \"reuse\") the final model is find-steps' best checkpoint: training "
        "is deterministic, so a rerun to that step would give the same weights. auto.final_run = "
        "\"retrain\" trains it again; auto.add_validation_back = true retrains with the validation images "
        "added back (same number of epochs), a run nothing measures.",
        untouched + " Everything goes under output.dir:",
        _files(
            ("find-lr/", "the LR sweep (find_lr.json, curve.csv, find_lr.png, probe_losses.npz)"),
            ("find-steps/", "the step search run (find_steps.json, find_steps.png, checkpoints/best/)"),
            ("final/", "only when retraining: a run directory, the model in final/checkpoints/final/"),
            ("report.html", "what was chosen and why, the plots, the cost, where the files are"),
            ("auto.json", "the same, machine-readable: status, find_lr, find_steps, chosen, final, warnings"),
        ),
    ), epilog=_config_keys("auto", AutoConfig))
    _add_config_args(p)
    _add_json_arg(p, "the result (the content of auto.json)")
    _add_progress_arg(p)


def _add_lora_commands(sub) -> None:
    """convert / merge / sample: LoRA files and images outside a training run."""
    from typing import get_args

    from difftune.config.schema import ModelConfig, SampleConfig

    sample_defaults = {name: field.default for name, field in SampleConfig.model_fields.items()}
    from difftune.models.registry import builtin_names

    model_source = (f"built-in name ({', '.join(builtin_names())}), diffusers folder or single .safetensors/.ckpt "
                    "checkpoint")

    p = _sub(sub, "convert", "rewrite a LoRA file in the kohya (ComfyUI/A1111) or diffusers layout", _text(
        "Rewrite a LoRA file in the other layout. kohya/LyCORIS layout (`lora_unet_...`, `lora_te_...` / "
        "`lora_te1_...`, `lora_te2_...` keys "
        "with alphas): what ComfyUI, A1111/Forge and kohya's scripts load. diffusers/PEFT layout "
        "(`unet.<module>.lora_A/lora_B`, no alphas): what pipeline.load_lora_weights loads; it holds plain "
        "LoRA pairs only. kohya -> diffusers folds alpha/rank into lora_B; diffusers -> kohya writes "
        "alpha = rank, so converting back gives the same tensors. The file's metadata is carried over.",
        "Reads INPUT (and, for --to diffusers with --model, that model's architecture); writes OUTPUT, and, for "
        "--to diffusers of a LoRA with bundled embeddings (pivotal tuning), each embedding as <token>.safetensors "
        "beside it (never over an existing file).",
    ))
    p.add_argument("input", metavar="INPUT", help="the LoRA .safetensors to read (kohya or diffusers layout, detected from its keys)")
    p.add_argument("output", metavar="OUTPUT", help="where to write the converted .safetensors")
    p.add_argument("--to", required=True, choices=["kohya", "diffusers"], metavar="LAYOUT",
                   help="target layout: kohya or diffusers (required)")
    p.add_argument("--model", default=None, metavar="MODEL",
                   help=f"model whose module paths name the layers when writing the diffusers layout: {model_source} "
                   "(default: the architectures difftune ships for the family the file's keys show)")

    p = _sub(sub, "merge", "bake a LoRA-family file into a model and save the full model", _text(
        "Load BASE, add LORA's update to its weights at --scale (any LoRA-family file: LoRA, LoCon, LoHa, "
        "LoKr, GLoKr, OFT, ...; kohya or diffusers layout) and save the full model. OUTPUT ending in .safetensors: "
        "one checkpoint in the original layout that A1111/Forge and ComfyUI load (fp16 by default); "
        "anything else: a diffusers folder, which must not exist or be empty (fp32 by default).",
        "Reads BASE and LORA; writes OUTPUT, and a LoRA's bundled embeddings (pivotal tuning) as "
        "<token>.safetensors beside a .safetensors OUTPUT or inside a folder (a checkpoint has no place for new "
        "words; never over an existing file).",
    ))
    p.add_argument("base", metavar="BASE", help=f"the model to merge into: {model_source}")
    p.add_argument("lora", metavar="LORA", help="LoRA-family .safetensors (kohya or diffusers layout)")
    p.add_argument("output", metavar="OUTPUT", help="a .safetensors path (one original-layout checkpoint) or a folder (diffusers)")
    p.add_argument("--scale", type=float, default=1.0, metavar="S",
                   help="strength of the LoRA: its update is multiplied by S (default: %(default)s)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None, metavar="P",
                   help="saved precision: fp32, fp16 or bf16 (default for a .safetensors file: fp16, bf16 for Flux/SD3; "
                   "fp32 for a folder)")
    p.add_argument("--set", dest="model_settings", action="append", default=[], metavar="model.KEY=VALUE",
                   help="a model setting, as in a config's [model] (repeatable), e.g. for a Flux transformer file: "
                   "--set model.text_encoder_path=clip_l.safetensors --set model.text_encoder_2_path=t5xxl.safetensors "
                   "--set model.vae_path=ae.safetensors --set model.tokenizer_path=t5-tokenizer/ (default: the model's own settings)")

    p = _sub(sub, "sample", "generate images from a model, optionally with a LoRA (training samples' pipeline)", _text(
        "Render each --prompt with MODEL, optionally with a LoRA-family file applied at --scale. It uses the "
        "code the training sample grids use (same pipeline, sampler names and per-prompt seeds), so an image "
        "made here matches the grid cell a run produced with the same settings. Nothing is downloaded.",
        "One prompt: the image is written to --out. Several: --out is a grid with the prompts under the "
        "images, and image i (from 0) goes beside it as <name>-i.png (sample-0.png, sample-1.png, ...). "
        "Prompt i uses seed --seed + i.",
    ))
    p.add_argument("model", metavar="MODEL", help=f"the model: {model_source}")
    p.add_argument("--prompt", dest="prompts", action="append", required=True, metavar="TEXT",
                   help="prompt to render (required; repeatable, one image each)")
    p.add_argument("--lora", default=None, metavar="FILE", help="LoRA-family .safetensors to apply, with the "
                   "embeddings it bundles (pivotal tuning) (default: none)")
    p.add_argument("--embedding", dest="embeddings", action="append", default=[], metavar="FILE",
                   help="textual-inversion embedding .safetensors (repeatable; default: none); write its token in "
                        "the prompt: the token difftune trained it with, else the file name")
    p.add_argument("--set", dest="model_settings", action="append", default=[], metavar="model.KEY=VALUE",
                   help="a model setting, as in a config's [model] (repeatable), e.g. for a Flux transformer file: "
                   "--set model.text_encoder_path=clip_l.safetensors --set model.text_encoder_2_path=t5xxl.safetensors "
                   "--set model.vae_path=ae.safetensors --set model.tokenizer_path=t5-tokenizer/ (default: the model's own settings)")
    p.add_argument("--scale", type=float, default=1.0, metavar="S", help="LoRA strength (default: %(default)s)")
    p.add_argument("--seed", type=int, default=sample_defaults["seed"], metavar="N",
                   help="seed of the first prompt; prompt i uses seed + i (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=sample_defaults["steps"], metavar="N",
                   help="sampler steps (default: %(default)s)")
    p.add_argument("--cfg-scale", type=float, default=sample_defaults["cfg_scale"], metavar="X",
                   help="classifier-free guidance scale (default: the model's: 7 for SD/SDXL/SD3, 3.5 for Flux.1-dev)")
    samplers = list(get_args(SampleConfig.model_fields["sampler"].annotation))
    p.add_argument("--sampler", default=sample_defaults["sampler"], choices=samplers, metavar="NAME",
                   help=f"sampler: {', '.join(samplers)} (default: %(default)s)")
    p.add_argument("--negative-prompt", default=sample_defaults["negative_prompt"], metavar="TEXT",
                   help="negative prompt (default: none)")
    p.add_argument("--width", type=positive_int, default=None, metavar="PX",
                   help="image width in pixels (default: the model's native size, UNet sample size x VAE factor)")
    p.add_argument("--height", type=positive_int, default=None, metavar="PX",
                   help="image height in pixels (default: the model's native size)")
    p.add_argument("--clip-skip", type=int, default=ModelConfig.model_fields["clip_skip"].default, metavar="N",
                   help="use the N-th last text encoder layer, 1-12, kohya's clip_skip (default: %(default)s)")
    p.add_argument("--out", default="sample.png", metavar="PNG",
                   help="PNG path; several prompts: a grid here plus -N files (default: %(default)s)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # --help ends here, before any heavy library is imported
    if args.version:
        from difftune import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return EXIT_USER_ERROR
    from difftune.library_noise import request

    request()
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
    _remember_model_facts(config)
    return 0


def _remember_model_facts(config) -> None:
    """What doctor would count on this model (model_facts.py), while the libraries are loaded anyway."""
    from difftune.model_facts import record_facts

    try:
        record_facts(config)
    except Exception:  # never fail a finished run over a doctor shortcut
        pass


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
    _remember_model_facts(config)
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

    config = load_config(args.config, args.overrides, libraries=False)  # doctor checks the optimizer's settings
    steps = args.steps
    if steps is None:
        if config.train.max_steps is not None or not (config.data.train_dir or config.data.subsets):
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
        + (f"validation loss: first {fmt(summary['first_val_loss'])}, final {fmt(summary['final_val_loss'])}, "
           f"best {fmt(summary['best_val_loss'])} at step {summary['best_val_step']}\n"
           if summary.get("best_val_loss") is not None else "validation loss: none (no validation images)\n")
        + f"run directory: {run_dir}  (plots/, samples/, checkpoints/, metrics.jsonl, summary.json)"
    )


def cmd_convert(args) -> int:
    from difftune.network.tools import convert_file

    done = convert_file(args.input, args.output, args.to, args.model)
    print(f"{args.input} ({done['from']}) -> {done['target']} ({done['to']}, {done['tensors']} tensors)")
    _say_embeddings(done, "the diffusers LoRA layout cannot hold them")
    return 0


def _say_embeddings(done: dict, why: str) -> None:
    for e in done.get("embeddings", []):
        print(f"the file's bundled embedding -> {e['file']} ({why}; load it as an embedding): write "
              f"'{e['token']}' in prompts with difftune sample --embedding or diffusers' load_textual_inversion(token="
              f"'{e['token']}'), '{e['file_name_word']}' in A1111/Forge, 'embedding:{e['file_name_word']}' in ComfyUI")


def cmd_merge(args) -> int:
    from difftune.network.tools import merge_into_model

    done = merge_into_model(args.base, args.lora, args.scale, args.output, args.precision,
                            model_settings=model_settings(args.model_settings))
    print(f"merged {done['layers']} layers of {args.lora} at scale {done['scale']:g} into {args.base} -> {done['target']}")
    _say_embeddings(done, "a checkpoint has no place for new words")
    return 0


def cmd_sample(args) -> int:
    from difftune.generate import generate

    written = generate(args.model, args.prompts, args.out, lora=args.lora, scale=args.scale,
                       embeddings=args.embeddings, seed=args.seed,
                       steps=args.steps, cfg_scale=args.cfg_scale, sampler=args.sampler,
                       negative_prompt=args.negative_prompt, width=args.width, height=args.height,
                       clip_skip=args.clip_skip, model_settings=model_settings(args.model_settings))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def model_settings(items: list[str]) -> dict:
    """`--set model.KEY=VALUE` items as ModelConfig fields (only model.* keys: these commands take no config)."""
    from difftune.config.loading import ConfigError, apply_overrides

    data = apply_overrides({}, items)
    other = sorted(set(data) - {"model"})
    if other:
        raise ConfigError(f"--set {other[0]}.…: this command takes model settings only (model.KEY=VALUE)")
    import difflib

    from difftune.config.schema import ModelConfig

    known = [k for k in ModelConfig.model_fields if k != "path"]
    for key in data.get("model", {}):
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean model.{close[0]}?)" if close else ""
            raise ConfigError(f"--set model.{key}: unknown model setting{hint}; valid: {', '.join(known)}")
    return data.get("model", {})


COMMANDS = {"train": cmd_train, "demo": cmd_demo, "doctor": cmd_doctor, "schedule": cmd_schedule}
COMMANDS.update({"convert": cmd_convert, "merge": cmd_merge, "sample": cmd_sample})


def _write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def cmd_find_lr(args) -> int:
    from difftune.config.loading import load_config
    from difftune.tuning.lr_finder import find_lr, format_result

    overrides = args.overrides + ([f"find_lr.group={args.group}"] if args.group else [])
    result = find_lr(load_config(args.config, overrides), show_progress=not args.no_progress)
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
