"""GPU check (issue 14): a Flux.1-dev-architecture LoRA rank 16 at 1024², batch 1, with fp8 base weights
and cached text embeddings, through difftune's own Trainer — peak VRAM (goal ≤ 24 GB) and samples/s.
Random weights at full size (nothing is downloaded); ≤ 5 minutes on an H200.

    python bench/gpu_flux_lora.py                       # writes bench/results/gpu_flux_lora.json
    python bench/gpu_flux_lora.py --blocks-to-swap 20   # the same with block swap

Without a GPU the same script runs on the tiny model, to check that it works before a GPU is at hand:

    python bench/gpu_flux_lora.py --model tiny-flux --resolution 16 --steps 3 --no-results

The model (transformer, CLIP-L, T5-XXL, VAE) is built from the shipped flux-dev configs with random
weights directly on the device and handed to the Trainer in place of loading a checkpoint; everything
else is the path users run: the text-embedding cache (T5 and CLIP encode every caption once, then go
to the CPU), fp8 storage of the frozen transformer, the VAE encoding each image, the LyCORIS LoRA,
AdamW, bf16 autocast, gradient checkpointing. The peak is measured over the timed training steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "gpu_flux_lora.json"


def build_model(name: str, device: str):
    from difftune.config.schema import ModelConfig
    from difftune.models import load_model

    if name.startswith("tiny-"):
        return load_model(ModelConfig(path=name))
    from gpu_common import random_model

    return random_model(name, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="flux-dev", choices=["flux-dev", "flux-schnell", "tiny-flux"])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20, help="timed steps after 3 warm-up steps")
    parser.add_argument("--base-precision", default="fp8", choices=["fp8", "bf16"])
    parser.add_argument("--blocks-to-swap", type=int, default=0)
    parser.add_argument("--work", default="bench/work/gpu_flux_lora")
    parser.add_argument("--no-results", action="store_true", help="do not write bench/results (CPU dry run)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    work = Path(args.work)
    from gpu_common import write_images

    write_images(work / "data", args.resolution)

    import difftune.training.loop as loop
    from difftune.config.loading import validate_config

    started_build = time.perf_counter()
    built = build_model(args.model, device)
    build_seconds = time.perf_counter() - started_build
    loop.load_model = lambda _config: built  # the Trainer's one model-loading call
    config = validate_config({
        "model": {"path": "tiny-flux", "base_precision": args.base_precision},  # path: the family, for the checks
        "data": {"train_dir": str(work / "data"), "resolution": args.resolution, "val_split": 0.0,
                 "cache_text_embeddings": True, "offload_encoders": True},
        "network": {"type": "lora", "rank": 16, "alpha": 16},
        "train": {"batch_size": 1, "max_steps": args.steps + 3, "lr": 1e-4, "gradient_checkpointing": True,
                  "mixed_precision": "bf16", "blocks_to_swap": args.blocks_to_swap},
        "validation": {"every_n_epochs": 0},
        "output": {"dir": str(work / "run"), "overwrite": True, "tensorboard": False, "save_state": False},
    }, "bench/gpu_flux_lora.py")
    trainer = loop.Trainer(config, show_progress=False)
    from gpu_common import timed_steps

    losses, seconds, peak = timed_steps(trainer, args.steps)
    trainer.close()
    stored = sorted({str(p.dtype) for p in built.transformer.parameters()})
    result = {
        "command": "python bench/gpu_flux_lora.py" + (f" --model {args.model}" if args.model != "flux-dev" else "")
        + (f" --blocks-to-swap {args.blocks_to_swap}" if args.blocks_to_swap else "")
        + (f" --base-precision {args.base_precision}" if args.base_precision != "fp8" else ""),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "model": args.model, "resolution": args.resolution, "batch_size": 1, "rank": 16,
        "base_precision": args.base_precision, "transformer_dtypes": stored,
        "blocks_to_swap": args.blocks_to_swap, "text_embeddings": "cached, encoders on the CPU",
        "precision": "bf16 autocast", "gradient_checkpointing": True,
        "build_seconds": build_seconds, "timed_steps": args.steps, "seconds": seconds,
        "samples_per_second": args.steps / seconds,
        "peak_vram_gib": peak,
        "goal_peak_vram_gib": 24, "final_loss": losses[-1], "lora_layers": len(trainer.network.loras),
    }
    print(json.dumps(result, indent=2))
    if not args.no_results:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
