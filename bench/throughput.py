"""Training throughput of difftune against diffusers' own example scripts, on the same job.

Both tools train the same model folder on the same images with the same batch, rank, optimizer (AdamW,
lr 1e-4, weight decay 1e-2, grad-norm clip 1), constant LR and step count, each with its defaults for
everything else a user would not touch (logging included). Cases:

- `sd1-lora`: LoRA rank 4 on the attention projections (to_q/k/v/out.0; difftune: preset attn-only)
  against `examples/text_to_image/train_text_to_image_lora.py`;
- `sd1-full`: the whole UNet against `train_text_to_image.py`;
- `sdxl-lora`: LoRA rank 4 on the SDXL UNet's attention against `train_text_to_image_lora_sdxl.py`.

What is timed. Every run is a separate process, timed from the outside; each tool runs every case
twice, with `--short` and `--long` steps, and its training rate is (long − short) · batch / (its long
wall time − its short wall time): start-up, model loading and the final save are in both runs and
cancel, so the figure is the training loop's samples/s, however each tool prints its own progress.
Rounds alternate the tools (diffusers, difftune, diffusers, ...) and the reported ratio is the median
of the per-round ratios, so a shared machine's drift moves it far less than the figures themselves.
difftune also runs with `data.cache_latents = "memory"` (diffusers' scripts have no latent cache).

The diffusers scripts are read at run time from a local diffusers checkout (`--diffusers DIR`: a work
tree with examples/text_to_image, or a bare git directory such as the library's mirror) into
bench/work/throughput/ref/ (gitignored, never committed). They need `datasets` and `torchvision`,
which difftune does not: run the benchmark in a venv that has both beside difftune (the torch 2.13 CPU
build has no torchvision that imports beside it), e.g.

    python3 -m venv bench/work/venv-throughput
    bench/work/venv-throughput/bin/pip install torch==2.14.1 torchvision==0.29.1
    bench/work/venv-throughput/bin/pip install -e ".[test]" datasets && \\
        bench/work/venv-throughput/bin/pip install --no-deps open_clip_torch
    OMP_NUM_THREADS=1 bench/work/venv-throughput/bin/python bench/throughput.py

On the CPU (default) the models are the built-in tiny ones at 64 px, one thread per process
(OMP_NUM_THREADS=1 is set for every run), nothing else running. `--device cuda` builds the real SD1.5
and SDXL architectures from the shipped configs with random weights (512², 1024²) and runs the GPU
cases the issue names; it writes the same files with the device in their name.

Writes bench/results/throughput_<device>.json and .md (the command included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
WORK = ROOT / "work" / "throughput"
SCRIPTS = {"sd1-lora": "train_text_to_image_lora.py", "sd1-full": "train_text_to_image.py",
           "sdxl-lora": "train_text_to_image_lora_sdxl.py"}
MODELS = {"sd1-lora": "sd1", "sd1-full": "sd1", "sdxl-lora": "sdxl"}
TINY = {"sd1": "tiny-sd", "sdxl": "tiny-sdxl"}
"""The built-in architecture each model folder is saved from on the CPU (random weights, fixed seed)."""
LR, WEIGHT_DECAY, RANK, CLIP = 1e-4, 1e-2, 4, 1.0


# ------------------------------------------------------------------------------------ inputs
def fetch_scripts(diffusers: Path) -> Path:
    """The example scripts from a diffusers work tree or bare git directory, into WORK/ref."""
    ref = WORK / "ref"
    ref.mkdir(parents=True, exist_ok=True)
    for script in SCRIPTS.values():
        inside = f"examples/text_to_image/{script}"
        if (diffusers / inside).is_file():
            shutil.copyfile(diffusers / inside, ref / script)
        else:
            text = subprocess.run(["git", f"--git-dir={diffusers}", "show", f"HEAD:{inside}"], check=True,
                                  capture_output=True, text=True).stdout
            (ref / script).write_text(text)
    work_tree = (diffusers / "examples").is_dir()
    where = ["-C", str(diffusers)] if work_tree else [f"--git-dir={diffusers}"]
    commit = subprocess.run(["git", *where, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (ref / "COMMIT").write_text(commit + "\n")
    return ref


def texture(rng, size: int):
    """A photo-like texture: a few octaves of smooth noise in three tinted channels, some stripes."""
    import numpy as np

    image = np.zeros((size, size, 3))
    for octave in (4, 8, 16, 32):
        coarse = rng.random((octave, octave, 3))
        image += np.kron(coarse, np.ones((size // octave + 1, size // octave + 1, 1)))[:size, :size] / octave
    angle, freq = rng.random() * np.pi, 2 + rng.random() * 10
    y, x = np.mgrid[0:size, 0:size] / size
    image += 0.3 * np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)))[..., None] * rng.random(3)
    image = (image - image.min()) / (np.ptp(image) + 1e-9)
    return (image * 255).astype("uint8")


def write_dataset(folder: Path, count: int, size: int) -> None:
    """`count` textures with captions, read by both tools from the same files: a .txt caption beside
    each image (difftune) and metadata.jsonl (the `datasets` imagefolder loader the scripts use)."""
    import numpy as np
    from PIL import Image

    if (folder / "metadata.jsonl").is_file() and len(list(folder.glob("*.png"))) == count:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = ["woven", "marble", "rusty", "mossy", "striped", "granite", "velvet", "bark", "sand", "copper"]
    lines = []
    for i in range(count):
        Image.fromarray(texture(rng, size)).save(folder / f"{i:04d}.png")
        caption = f"a photo of a {words[i % len(words)]} texture, close-up, number {i}"
        (folder / f"{i:04d}.txt").write_text(caption)
        lines.append(json.dumps({"file_name": f"{i:04d}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def write_model(name: str, device: str) -> Path:
    """A model folder in the diffusers layout both tools load: tiny on the CPU, full size on a GPU."""
    folder = WORK / "models" / f"{name}-{device}"
    if (folder / "model_index.json").is_file():
        return folder
    import torch

    from difftune.config.schema import ModelConfig
    from difftune.models import load_model

    torch.manual_seed(0)
    if name == "sd1-test":
        test_tiny_sd1(folder)
        return folder
    if device == "cpu":
        load_model(ModelConfig(path=TINY[name])).save_pretrained(folder)
        return folder
    from gpu_common import random_model

    model = random_model(name, device)
    model.save_pretrained(folder, dtype=torch.float16)
    for tokenizer in ("tokenizer", "tokenizer_2"):  # vocabulary files the scripts' CLIPTokenizer reads
        if (folder / tokenizer).is_dir():
            tiny = write_model(name, "cpu") / tokenizer
            shutil.rmtree(folder / tokenizer)
            shutil.copytree(tiny, folder / tokenizer)
    return folder


def test_tiny_sd1(folder: Path) -> None:
    """The tiny SD1 of diffusers' own pipeline tests (UNet channels 32/64 with cross-attention at the
    lower resolution only, 2x VAE, 5-layer width-32 CLIP): so small that a step is mostly the trainers'
    own overhead, the regime the issue's first measurement (diffusers at ~20 it/s) was in."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from difftune.models.clip_tokenizers import BYTE_LEVEL_VOCAB_SIZE, byte_level_clip_tokenizer
    from difftune.models.sd.tiny import sd_noise_scheduler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=BYTE_LEVEL_VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=5,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=BYTE_LEVEL_VOCAB_SIZE - 2,
        eos_token_id=BYTE_LEVEL_VOCAB_SIZE - 1, pad_token_id=BYTE_LEVEL_VOCAB_SIZE - 1))
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=byte_level_clip_tokenizer(), unet=unet,
                            scheduler=sd_noise_scheduler(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(str(folder), safe_serialization=True)


# -------------------------------------------------------------------------------------- runs
def diffusers_command(python: str, ref: Path, case: str, model: Path, data: Path, out: Path, steps: int,
                      args) -> list[str]:
    command = [python, str(ref / SCRIPTS[case]), f"--pretrained_model_name_or_path={model}",
               f"--train_data_dir={data}", f"--resolution={args.resolution}", "--center_crop",
               f"--train_batch_size={args.batch_size}", f"--max_train_steps={steps}", f"--learning_rate={LR}",
               "--lr_scheduler=constant", "--lr_warmup_steps=0", f"--adam_weight_decay={WEIGHT_DECAY}",
               f"--max_grad_norm={CLIP}", f"--output_dir={out}", "--seed=1", "--checkpointing_steps=1000000",
               f"--mixed_precision={args.mixed_precision}", f"--dataloader_num_workers={args.workers}"]
    if case.endswith("lora"):
        command.append(f"--rank={RANK}")
    if args.gradient_checkpointing:
        command.append("--gradient_checkpointing")
    return command


def difftune_config(case: str, model: Path, data: Path, out: Path, steps: int, args, cache: str) -> dict:
    config = {
        "model": {"path": str(model)},
        "data": {"train_dir": str(data), "resolution": args.resolution, "center_crop": True, "flip_p": 0.0,
                 "val_split": 0.0, "num_workers": args.workers, "cache_latents": cache},
        "train": {"batch_size": args.batch_size, "max_steps": steps, "lr": LR, "lr_scheduler": "constant",
                  "lr_warmup_steps": 0, "clip_grad_norm": CLIP, "seed": 1, "mixed_precision": args.mixed_precision,
                  "gradient_checkpointing": args.gradient_checkpointing},
        "optimizer": {"name": "adamw", "weight_decay": WEIGHT_DECAY},
        "output": {"dir": str(out), "overwrite": True},
    }
    if args.compile:
        config["train"]["compile"] = True
    if case.endswith("lora"):
        config["network"] = {"type": "lora", "preset": "attn-only", "rank": RANK, "alpha": RANK}
    return config


def write_toml(path: Path, data: dict) -> None:
    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")

    lines = []
    for section, keys in data.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value(v)}" for key, v in keys.items()]
        lines.append("")
    path.write_text("\n".join(lines))


def timed_run(command: list[str], log: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - started
    if done.returncode:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(command[:3])} ... failed (exit {done.returncode}); log {log}:\n{tail}")
    return seconds


def rate(short: float, long: float, steps: int, batch: int) -> float:
    """Samples/s of the training loop from two runs that differ only in `steps` optimizer steps."""
    return steps * batch / (long - short) if long > short else float("nan")


def run_case(case: str, ref: Path, model: Path, data: Path, args, env: dict[str, str]) -> dict[str, Any]:
    tools = ["diffusers", "difftune", "difftune-cached"]
    times: dict[str, list[tuple[float, float]]] = {tool: [] for tool in tools}
    for round_ in range(-1, args.rounds):  # round -1 warms the file cache and is not counted
        order = tools if round_ % 2 == 0 else list(reversed(tools))  # each tool first and last in turn
        for tool in order:
            pair = []
            for steps in (args.short, args.long):
                out = WORK / "runs" / case / tool
                log = WORK / "logs" / f"{case}-{tool}-r{round_}-{steps}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(out, ignore_errors=True)
                if tool == "diffusers":
                    command = diffusers_command(args.python, ref, case, model, data, out, steps, args)
                else:
                    config = out.parent / f"{tool}-{steps}.toml"
                    config.parent.mkdir(parents=True, exist_ok=True)
                    cache = "memory" if tool == "difftune-cached" else "off"
                    write_toml(config, difftune_config(case, model, data, out, steps, args, cache))
                    command = [args.python, "-m", "difftune.cli.main", "train", str(config), "--no-progress"]
                pair.append(timed_run(command, log, env))
                if round_ < 0:
                    break  # one short run of each tool warms up
            if round_ < 0:
                continue
            times[tool].append(tuple(pair))
            r = rate(*pair, args.long - args.short, args.batch_size)
            print(f"{case} round {round_ + 1} {tool}: {pair[0]:.1f} s / {pair[1]:.1f} s → {r:.2f} samples/s",
                  flush=True)
    steps, batch = args.long - args.short, args.batch_size
    rates = {tool: [rate(short, long, steps, batch) for short, long in times[tool]] for tool in tools}
    row = {tool: {"samples_per_second": round(statistics.median(rates[tool]), 3),
                  "rounds_samples_per_second": [round(r, 3) for r in rates[tool]],
                  "rounds_wall_seconds": [[round(short, 2), round(long, 2)] for short, long in times[tool]]} for tool in tools}
    for tool in ("difftune", "difftune-cached"):
        ratios = [d / r for d, r in zip(rates[tool], rates["diffusers"], strict=True)]
        row[tool]["ratio_to_diffusers"] = round(statistics.median(ratios), 3)
        row[tool]["rounds_ratio_to_diffusers"] = [round(r, 3) for r in ratios]
    return row


# ------------------------------------------------------------------------------------ report
def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = ["# Throughput against diffusers' example scripts (bench/throughput.py)", "",
             f"`{r['command']}` — difftune {r['difftune_version']}, diffusers {r['diffusers_version']} (examples at "
             f"{r['diffusers_examples_commit'][:12]}), torch {r['torch']}, device {r['device']}, "
             f"{s['threads']} thread(s) per process, {r['cpu_count']} CPUs.", "",
             f"{s['images']} texture images at {s['resolution']} px, batch {s['batch_size']}, rank {RANK}, AdamW lr {LR}, "
             f"{s['long'] - s['short']} timed steps (runs of {s['short']} and {s['long']} steps, differenced), "
             f"{s['rounds']} alternating rounds after one warm-up run of each, mixed precision {s['mixed_precision']}.", "",
             "| case | diffusers samples/s | difftune samples/s | × diffusers | difftune, cached latents | × diffusers |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for case, row in r["cases"].items():
        lines.append(f"| {case} | {row['diffusers']['samples_per_second']} | {row['difftune']['samples_per_second']} | "
                     f"{row['difftune']['ratio_to_diffusers']} | {row['difftune-cached']['samples_per_second']} | "
                     f"{row['difftune-cached']['ratio_to_diffusers']} |")
    lines += ["", "× diffusers is the median over rounds of each round's ratio; per-round figures are in the JSON.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers", default=os.environ.get("DIFFTUNE_DIFFUSERS", "/work/.mirror/huggingface+diffusers/repo"),
                        help="a diffusers work tree or bare git directory holding examples/text_to_image")
    parser.add_argument("--python", default=sys.executable, help="interpreter for both tools (needs torchvision, datasets)")
    parser.add_argument("--cases", default="sd1-lora,sd1-full,sdxl-lora")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sd1", default="test", choices=["test", "tiny-sd"],
                        help="the CPU's SD1 model: diffusers' test-pipeline size (overhead-bound) or difftune's "
                        "tiny-sd (attention at 32x32 latents: arithmetic-bound)")
    parser.add_argument("--resolution", type=int, default=None, help="default 64 on the CPU, 512 (SDXL 1024) on a GPU")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--short", type=int, default=5)
    parser.add_argument("--long", type=int, default=205)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of both tools")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run (CPU)")
    parser.add_argument("--mixed-precision", default=None, help="default no on the CPU, bf16 on a GPU")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="difftune train.compile = true")
    parser.add_argument("--out", default=None, help="result name under bench/results/ (default throughput_<device>)")
    args = parser.parse_args()
    args.mixed_precision = args.mixed_precision or ("no" if args.device == "cpu" else "bf16")
    args.resolution = args.resolution or (64 if args.device == "cpu" else 512)

    sys.path.insert(0, str(ROOT))
    ref = fetch_scripts(Path(args.diffusers))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT.parent / "src")}
    cases = [c for c in args.cases.split(",") if c]
    results: dict[str, Any] = {"cases": {}}
    for case in cases:
        resolution = args.resolution if not (case.startswith("sdxl") and args.device == "cuda") else 1024
        data = WORK / "data" / f"textures-{resolution}"
        write_dataset(data, args.images, resolution)
        name = MODELS[case]
        if name == "sd1" and args.device == "cpu" and args.sd1 == "test":
            name = "sd1-test"
        model = write_model(name, args.device)
        case_args = argparse.Namespace(**{**vars(args), "resolution": resolution})
        results["cases"][case] = run_case(case, ref, model, data, case_args, env)
        print(json.dumps({case: results["cases"][case]}, indent=1), flush=True)

    import diffusers
    import torch

    from difftune import __version__

    results.update({
        "what": "training samples/s of difftune and diffusers' example scripts on the same job",
        "command": "python bench/throughput.py " + " ".join(sys.argv[1:]),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "settings": {"resolution": args.resolution, "batch_size": args.batch_size, "images": args.images,
                     "short": args.short, "long": args.long, "rounds": args.rounds, "threads": args.threads,
                     "mixed_precision": args.mixed_precision, "workers": args.workers, "sd1_model": args.sd1,
                     "gradient_checkpointing": args.gradient_checkpointing, "compile": args.compile},
        "diffusers_examples_commit": (ref / "COMMIT").read_text().strip(),
        "difftune_version": __version__, "diffusers_version": diffusers.__version__, "torch": torch.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
    })
    name = args.out or f"throughput_{args.device}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
