"""Training throughput of difftune against diffusers' own example scripts, on the same job.

Both tools train the same model folder on the same images with the same batch, rank, optimizer (AdamW,
lr 1e-4, weight decay 1e-2, grad-norm clip 1), constant LR and step count, each with its defaults for
everything else a user would not touch (logging included). Cases:

- `sd1-lora`: LoRA on the attention projections (to_q/k/v/out.0; difftune: preset attn-only)
  against `examples/text_to_image/train_text_to_image_lora.py`;
- `sd1-full`: the whole UNet against `train_text_to_image.py`;
- `sdxl-lora`: LoRA on the SDXL UNet's attention against `train_text_to_image_lora_sdxl.py`.

What is timed. Every run is a separate process under bench/step_clock.py, which stamps the end of
every optimizer step (a global torch hook, the same for both tools) and records peak memory.
`--timing differenced` (the CPU's default): each tool runs every case twice, with `--short` and
`--long` steps, and its rate is (long − short) · batch / (long wall time − short wall time): start-up,
model loading and the final save cancel. `--timing steps` (a GPU's default, where start-ups would eat
the time budget): one run per tool, rate from the step clock after `--warmup-steps`. Both figures are
reported either way; they measure the same loop. Rounds alternate the tools and the ratio is the
median of the per-round ratios, so a shared machine's drift moves it far less than the figures.
difftune also runs with `data.cache_latents = "memory"` (diffusers' scripts have no latent cache).
Model FLOPs per step (denoiser forward + backward, bench/step_flops.py, on the meta device) give
each tool's TFLOP/s and, on a GPU, MFU against the card's dense bf16 peak (PEAK_BF16_TFLOPS).

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

On the CPU (default) the models are small ones at 64 px (SD1: diffusers' test-pipeline size; SDXL:
difftune's tiny-sdxl), LoRA rank 4, batch 4, one thread per process, nothing else running;
`--full-size` builds the real architectures instead, to check a GPU run's set-up on the CPU.
`--device cuda` runs the issue's GPU jobs (GPU_JOBS: SD1.5 LoRA rank 16 and full at 512² batch 8,
SDXL LoRA rank 16 at 1024² batch 1 with gradient checkpointing) on the real architectures with
random fp16 weights, bf16 autocast; bench/gpu_throughput.sh is that run as one command.

Writes bench/results/throughput_cpu (or _gpu).json and .md (the command included), after each case.
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
STEP_CLOCK = ROOT / "step_clock.py"
SCRIPTS = {"sd1-lora": "train_text_to_image_lora.py", "sd1-full": "train_text_to_image.py",
           "sdxl-lora": "train_text_to_image_lora_sdxl.py"}
MODELS = {"sd1-lora": "sd1", "sd1-full": "sd1", "sdxl-lora": "sdxl"}
TINY = {"sd1": "tiny-sd", "sdxl": "tiny-sdxl"}
"""The built-in architecture each model folder is saved from on the CPU (random weights, fixed seed)."""
LR, WEIGHT_DECAY, CLIP = 1e-4, 1e-2, 1.0
GPU_JOBS = {"sd1-lora": {"resolution": 512, "batch_size": 8, "rank": 16},
            "sd1-full": {"resolution": 512, "batch_size": 8},
            "sdxl-lora": {"resolution": 1024, "batch_size": 1, "rank": 16, "gradient_checkpointing": True}}
"""The issue's GPU jobs; the SDXL one is also the "LoRA at 1024², batch 1, checkpointed, in 12 GB" check."""
CPU_JOB = {"batch_size": 4, "rank": 4}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0}
"""Dense bf16 tensor-core peaks from the vendors' data sheets (SXM parts), matched against the device
name; `--peak-tflops` overrides."""
SDXL_VRAM_GOAL_GIB = 12.0


# ------------------------------------------------------------------------------------ inputs
def fetch_scripts(diffusers: Path) -> Path:
    """The example scripts from a diffusers work tree or bare git directory, into WORK/ref; without
    one, the scripts already there (a GPU machine gets WORK/ref carried with the working tree)."""
    ref = WORK / "ref"
    if not diffusers.exists():
        if all((ref / name).is_file() for name in [*SCRIPTS.values(), "COMMIT"]):
            return ref
        raise SystemExit(f"--diffusers {diffusers}: no such diffusers checkout, and {ref} holds no copied scripts; "
                         "fetch github:huggingface/diffusers (the library's mirror) or pass a checkout")
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


def write_model(name: str, device: str, full_size: bool) -> Path:
    """A model folder in the diffusers layout both tools load: tiny on the CPU, full size on a GPU (or
    on the CPU with `full_size`, to check a GPU run's set-up). Written beside and renamed when whole,
    so an interrupted write is never taken for a model."""
    folder = WORK / "models" / f"{name}-{device}{'-full' if full_size and device == 'cpu' else ''}"
    if (folder / "model_index.json").is_file():
        return folder
    import torch

    from difftune.config.schema import ModelConfig
    from difftune.models import load_model

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    torch.manual_seed(0)
    if name == "sd1-test":
        test_tiny_sd1(partial)
    elif device == "cpu" and not full_size:
        load_model(ModelConfig(path=TINY[name])).save_pretrained(partial)
    else:
        from gpu_common import random_model

        model = random_model(name, device)
        model.save_pretrained(partial, dtype=torch.float16)
        del model
        for tokenizer in ("tokenizer", "tokenizer_2"):  # vocabulary files the scripts' CLIPTokenizer reads
            if (partial / tokenizer).is_dir():
                tiny = write_model(name, "cpu", False) / tokenizer
                shutil.rmtree(partial / tokenizer)
                shutil.copytree(tiny, partial / tokenizer)
        if device == "cuda":
            torch.cuda.empty_cache()  # the bench process holds nothing on the GPU while the tools run
    partial.rename(folder)
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
        command.append(f"--rank={args.rank}")
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
        config["network"] = {"type": "lora", "preset": "attn-only", "rank": args.rank, "alpha": args.rank}
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


def timed_run(command: list[str], log: Path, env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    """Wall seconds of `command` run under bench/step_clock.py, and what the clock recorded."""
    record = log.with_suffix(".clock.json")
    record.unlink(missing_ok=True)
    command = [command[0], str(STEP_CLOCK), str(record), *command[1:]]
    started = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - started
    if done.returncode or not record.is_file():
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(command[:5])} ... failed (exit {done.returncode}); log {log}:\n{tail}")
    return seconds, json.loads(record.read_text())


def rate(short: float, long: float, steps: int, batch: int) -> float:
    """Samples/s of the training loop from two runs that differ only in `steps` optimizer steps."""
    return steps * batch / (long - short) if long > short else float("nan")


def clock_rate(record: dict[str, Any], steps: int, warmup: int, batch: int, what: str) -> float:
    """Samples/s between the end of optimizer step `warmup` and the last one, from the step clock."""
    ends = record["step_ends"]
    if len(ends) != steps:
        raise SystemExit(f"{what}: the step clock saw {len(ends)} optimizer steps, the run was asked for {steps}; "
                         "the timing would not be of the same job")
    warmup = min(warmup, steps // 4)
    return (steps - 1 - warmup) * batch / (ends[-1] - ends[warmup])


def peak_memory_mb(records: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("cuda_peak_allocated_mb", "cuda_peak_reserved_mb", "max_rss_mb")
    return {key: round(max(r[key] for r in records), 1) for key in keys if all(key in r for r in records)}


def run_case(case: str, ref: Path, model: Path, data: Path, args, env: dict[str, str]) -> dict[str, Any]:
    tools = ["diffusers", "difftune", "difftune-cached"]
    lengths = (args.short, args.long) if args.timing == "differenced" else (args.long,)
    walls: dict[str, list[list[float]]] = {tool: [] for tool in tools}
    clocks: dict[str, list[float]] = {tool: [] for tool in tools}
    records: dict[str, list[dict[str, Any]]] = {tool: [] for tool in tools}
    for round_ in range(-1 if args.warmup_round else 0, args.rounds):  # round -1 warms the file cache
        order = tools if round_ % 2 == 0 else list(reversed(tools))  # each tool first and last in turn
        for tool in order:
            pair = []
            for steps in lengths:
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
                seconds, record = timed_run(command, log, env)
                pair.append(seconds)
                if round_ < 0:
                    break  # one short run of each tool warms up
            if round_ < 0:
                continue
            walls[tool].append(pair)
            records[tool].append(record)
            clocks[tool].append(clock_rate(record, args.long, args.warmup_steps, args.batch_size, f"{case} {tool}"))
            shown = f"{pair[0]:.1f} s / {pair[1]:.1f} s → {rate(*pair, args.long - args.short, args.batch_size):.2f}" \
                if len(pair) == 2 else f"{pair[0]:.1f} s"
            print(f"{case} round {round_ + 1} {tool}: {shown}; step clock {clocks[tool][-1]:.2f} samples/s", flush=True)
    if args.timing == "differenced":
        rates = {tool: [rate(*pair, args.long - args.short, args.batch_size) for pair in walls[tool]] for tool in tools}
    else:
        rates = clocks
    row: dict[str, Any] = {"job": {k: getattr(args, k) for k in ("resolution", "batch_size", "rank",
                                                                  "gradient_checkpointing")}}
    if args.flops_per_step:
        row["job"]["model_flops_per_step"] = args.flops_per_step
    for tool in tools:
        row[tool] = {"samples_per_second": round(statistics.median(rates[tool]), 3),
                     "rounds_samples_per_second": [round(r, 3) for r in rates[tool]],
                     "step_clock_samples_per_second": round(statistics.median(clocks[tool]), 3),
                     "rounds_step_clock_samples_per_second": [round(r, 3) for r in clocks[tool]],
                     "rounds_wall_seconds": [[round(w, 2) for w in pair] for pair in walls[tool]],
                     "peak_memory_mb": peak_memory_mb(records[tool])}
        if args.flops_per_step:
            achieved = args.flops_per_step / args.batch_size * row[tool]["samples_per_second"] / 1e12
            row[tool]["model_tflops_per_second"] = float(f"{achieved:.4g}")
            if args.peak_tflops:
                row[tool]["mfu"] = round(achieved / args.peak_tflops, 4)
    for tool in ("difftune", "difftune-cached"):
        ratios = [d / r for d, r in zip(rates[tool], rates["diffusers"], strict=True)]
        row[tool]["ratio_to_diffusers"] = round(statistics.median(ratios), 3)
        row[tool]["rounds_ratio_to_diffusers"] = [round(r, 3) for r in ratios]
    return row


# ------------------------------------------------------------------------------------ report
def _memory(row: dict[str, Any]) -> str:
    m = row["peak_memory_mb"]
    if "cuda_peak_allocated_mb" in m:
        return f"{m['cuda_peak_allocated_mb'] / 1024:.2f} / {m['cuda_peak_reserved_mb'] / 1024:.2f} GiB"
    return f"{m['max_rss_mb'] / 1024:.2f} GiB RSS"


def goals(r: dict[str, Any]) -> list[str]:
    """The issue's GPU goals, each against the measured figure."""
    cases, lines = r["cases"], []
    if "sd1-lora" in cases:
        row = cases["sd1-lora"]
        best = max(("difftune", "difftune-cached"), key=lambda t: row[t]["samples_per_second"])
        mfu = row[best].get("mfu")
        lines.append(f"- SD1.5 LoRA ≥ 1.5× diffusers: {row['difftune']['ratio_to_diffusers']}× "
                     f"({row['difftune-cached']['ratio_to_diffusers']}× with cached latents)")
        if mfu is not None:
            lines.append(f"- SD1.5 LoRA ≥ 40% MFU: {100 * mfu:.1f}% ({best})")
        mem = {t: row[t]["peak_memory_mb"].get("cuda_peak_allocated_mb") for t in ("diffusers", "difftune")}
        if None not in mem.values():
            lines.append(f"- SD1.5 LoRA peak VRAM ≤ diffusers': difftune {mem['difftune'] / 1024:.2f} GiB, "
                         f"diffusers {mem['diffusers'] / 1024:.2f} GiB (allocated)")
    if "sdxl-lora" in cases:
        row = cases["sdxl-lora"]
        reserved = row["difftune"]["peak_memory_mb"].get("cuda_peak_reserved_mb")
        if reserved is not None:
            job = row["job"]
            lines.append(f"- SDXL LoRA {job['resolution']}², batch {job['batch_size']}, gradient checkpointing "
                         f"{'on' if job['gradient_checkpointing'] else 'off'} ≤ {SDXL_VRAM_GOAL_GIB:g} GiB: difftune "
                         f"reserved {reserved / 1024:.2f} GiB → {'met' if reserved / 1024 <= SDXL_VRAM_GOAL_GIB else 'NOT met'}")
    return lines


def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    timing = (f"{s['long'] - s['short']} timed steps (runs of {s['short']} and {s['long']} steps, differenced)"
              if s["timing"] == "differenced" else
              f"runs of {s['long']} steps timed by the step clock after step {s['warmup_steps']}")
    lines = ["# Throughput against diffusers' example scripts (bench/throughput.py)", "",
             f"`{r['command']}` — difftune {r['difftune_version']}, diffusers {r['diffusers_version']} (examples at "
             f"{r['diffusers_examples_commit'][:12]}), torch {r['torch']}, device {r['device']}, "
             f"{s['threads']} thread(s) per process, {r['cpu_count']} CPUs.", "",
             f"{s['images']} texture images, AdamW lr {LR}, {timing}, {s['rounds']} alternating rounds"
             f"{' after one warm-up run of each' if s['warmup_round'] else ''}, mixed precision {s['mixed_precision']}"
             f"{', train.compile on' if s['compile'] else ''}.", "",
             "| case | job | diffusers samples/s | difftune samples/s | × diffusers | difftune, cached latents | × diffusers |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for case, row in r["cases"].items():
        job = row["job"]
        what = (f"{job['resolution']} px, batch {job['batch_size']}" + (f", rank {job['rank']}" if case.endswith("lora") else "")
                + (", grad. checkpointing" if job["gradient_checkpointing"] else ""))
        lines.append(f"| {case} | {what} | {row['diffusers']['samples_per_second']} | {row['difftune']['samples_per_second']} | "
                     f"{row['difftune']['ratio_to_diffusers']} | {row['difftune-cached']['samples_per_second']} | "
                     f"{row['difftune-cached']['ratio_to_diffusers']} |")
    lines += ["", "× diffusers is the median over rounds of each round's ratio; per-round figures are in the JSON.", "",
              "Per tool: the step clock's samples/s (bench/step_clock.py: optimizer step ends, from step "
              f"{s['warmup_steps']} of the {s['long']}-step run), model FLOP/s from the denoiser's forward + backward "
              "counted on the meta device (bench/step_flops.py), and peak memory "
              "(CUDA allocated / reserved, or the process's peak RSS on the CPU).", "",
              "| case | tool | step clock samples/s | model TFLOP/s | MFU | peak memory |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for case, row in r["cases"].items():
        for tool in ("diffusers", "difftune", "difftune-cached"):
            t = row[tool]
            mfu = f"{100 * t['mfu']:.1f}%" if "mfu" in t else "—"
            lines.append(f"| {case} | {tool} | {t['step_clock_samples_per_second']} | {t.get('model_tflops_per_second', '—')} | "
                         f"{mfu} | {_memory(t)} |")
    if r["device"] != "cpu":
        lines += ["", f"## The issue's GPU goals (peak {s['peak_tflops']} bf16 TFLOP/s)", "", *goals(r)]
    lines.append("")
    return "\n".join(lines)


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


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
    parser.add_argument("--resolution", type=int, default=None, help="default 64 on the CPU; on a GPU each job's own")
    parser.add_argument("--batch-size", type=int, default=None, help="default 4 on the CPU; on a GPU each job's own")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank; default 4 on the CPU, 16 on a GPU")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--timing", choices=["differenced", "steps"], default=None,
                        help="differenced: two runs per tool (default on the CPU); steps: one run per tool, timed by "
                        "the step clock (default on a GPU, where start-up costs most of the time budget)")
    parser.add_argument("--short", type=int, default=5)
    parser.add_argument("--long", type=int, default=None, help="steps of the (long) run; default 205 CPU, 65 GPU")
    parser.add_argument("--warmup-steps", type=int, default=10, help="steps the step clock leaves out")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 on the CPU, 1 on a GPU")
    parser.add_argument("--warmup-round", action=argparse.BooleanOptionalAction, default=None,
                        help="one short run of each tool before the timed rounds (default on the CPU only)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of both tools")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every run; default 1 on the CPU")
    parser.add_argument("--mixed-precision", default=None, help="default no on the CPU, bf16 on a GPU")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="difftune train.compile = true")
    parser.add_argument("--full-size", action="store_true",
                        help="the real architectures (random weights) on the CPU too: checks a GPU run's set-up "
                        "at a small resolution and batch (on a GPU they always are)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--out", default=None, help="result name under bench/results/ (default throughput_cpu or _gpu)")
    parser.add_argument("--scripts-only", action="store_true",
                        help="copy diffusers' scripts into bench/work/throughput/ref and stop (a GPU run's preparation)")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.mixed_precision = args.mixed_precision or ("bf16" if gpu else "no")
    args.timing = args.timing or ("steps" if gpu else "differenced")
    args.long = args.long or (45 if gpu else 205)
    args.rounds = args.rounds or (1 if gpu else 3)
    args.warmup_round = (not gpu) if args.warmup_round is None else args.warmup_round
    args.threads = args.threads or (max(1, (os.cpu_count() or 2) // 2) if gpu else 1)
    args.out = args.out or ("throughput_gpu" if gpu else "throughput_cpu")

    if args.scripts_only:
        print(f"diffusers' scripts in {fetch_scripts(Path(args.diffusers))}")
        return
    sys.path.insert(0, str(ROOT))
    import torch
    from step_flops import denoiser_step_flops

    device_name = torch.cuda.get_device_name(0) if gpu else "cpu"
    args.peak_tflops = args.peak_tflops or (peak_tflops(device_name) if gpu else None)
    ref = fetch_scripts(Path(args.diffusers))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT.parent / "src")}
    cases = [c for c in args.cases.split(",") if c]
    results: dict[str, Any] = {"cases": {}}
    for case in cases:
        job = {"resolution": 64, "gradient_checkpointing": False, **CPU_JOB} if not gpu else \
            {"rank": None, "gradient_checkpointing": False, **GPU_JOBS[case]}
        for key in ("resolution", "batch_size", "rank"):
            job[key] = getattr(args, key) or job[key]
        job["gradient_checkpointing"] = job["gradient_checkpointing"] or args.gradient_checkpointing
        if not case.endswith("lora"):
            job["rank"] = None
        data = WORK / "data" / f"textures-{job['resolution']}"
        write_dataset(data, args.images, job["resolution"])
        name = MODELS[case]
        if name == "sd1" and not gpu and not args.full_size and args.sd1 == "test":
            name = "sd1-test"
        model = write_model(name, args.device, args.full_size)
        flops = denoiser_step_flops(model, job["rank"], job["batch_size"], job["resolution"])
        case_args = argparse.Namespace(**{**vars(args), **job, "flops_per_step": flops})
        results["cases"][case] = run_case(case, ref, model, data, case_args, env)
        print(json.dumps({case: results["cases"][case]}, indent=1), flush=True)
        write_results(results, args, device_name, ref)  # after every case: a run cut short keeps what it measured
    print((RESULTS / f"{args.out}.md").read_text())


def write_results(results: dict[str, Any], args, device_name: str, ref: Path) -> None:
    import diffusers
    import torch

    from difftune import __version__

    results.update({
        "what": "training samples/s of difftune and diffusers' example scripts on the same job",
        "command": "python bench/throughput.py " + " ".join(sys.argv[1:]),
        "device": device_name,
        "settings": {"images": args.images, "timing": args.timing, "short": args.short, "long": args.long,
                     "warmup_steps": args.warmup_steps, "rounds": args.rounds, "warmup_round": args.warmup_round,
                     "threads": args.threads, "mixed_precision": args.mixed_precision, "workers": args.workers,
                     "sd1_model": args.sd1, "full_size": args.full_size or args.device == "cuda", "compile": args.compile, "peak_tflops": args.peak_tflops},
        "diffusers_examples_commit": (ref / "COMMIT").read_text().strip(),
        "difftune_version": __version__, "diffusers_version": diffusers.__version__, "torch": torch.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
    })
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
