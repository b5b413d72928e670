"""GPU check (issue 13): SDXL LoRA rank 16 at 1024², bf16, batch 1, gradient checkpointing, through
difftune's own Trainer — peak VRAM and samples/s. Random weights at full size (nothing is downloaded).

On a GPU machine (≤ 5 minutes):

    python bench/gpu_sdxl_lora.py                      # writes bench/results/gpu_sdxl_lora.json

Without a GPU the same script runs on the tiny model, to check that it works before a GPU is at hand:

    python bench/gpu_sdxl_lora.py --model tiny-sdxl --resolution 16 --steps 3 --no-results

The model is built from the shipped SDXL configs with random weights directly on the device and handed
to the Trainer (in place of loading a checkpoint); everything else is the training path users run:
data loading, VAE encoding, both text encoders, the LyCORIS LoRA, AdamW, autocast, checkpointing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "gpu_sdxl_lora.json"


def random_model(name: str, device: str):
    """SDXL (or tiny-sdxl) with random weights, built on `device` (fast: no fp32 copy on the host)."""
    from difftune.config.schema import ModelConfig
    from difftune.models import load_model

    if name == "tiny-sdxl":
        return load_model(ModelConfig(path=name))
    from gpu_common import random_model as shipped_random

    return shipped_random("sdxl", device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdxl", choices=["sdxl", "tiny-sdxl"])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30, help="timed steps after 3 warm-up steps")
    parser.add_argument("--work", default="bench/work/gpu_sdxl_lora")
    parser.add_argument("--no-results", action="store_true", help="do not write bench/results (CPU dry run)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    work = Path(args.work)
    from gpu_common import write_images

    write_images(work / "data", args.resolution)

    import difftune.training.loop as loop
    from difftune.config.loading import validate_config

    built = random_model(args.model, device)
    loop.load_model = lambda _config: built  # the Trainer's one model-loading call
    config = validate_config({
        "model": {"path": "tiny-sdxl"},  # replaced above; names a loadable family for the config checks
        "data": {"train_dir": str(work / "data"), "resolution": args.resolution, "val_split": 0.0},
        "network": {"type": "lora", "rank": 16, "alpha": 16},
        "train": {"batch_size": 1, "max_steps": args.steps + 3, "lr": 1e-4, "gradient_checkpointing": True,
                  "mixed_precision": "bf16" if cuda else "no"},
        "validation": {"every_n_epochs": 0},
        "output": {"dir": str(work / "run"), "overwrite": True, "tensorboard": False, "save_state": False},
    }, "bench/gpu_sdxl_lora.py")
    trainer = loop.Trainer(config, show_progress=False)
    from gpu_common import timed_steps

    losses, seconds, peak = timed_steps(trainer, args.steps)
    trainer.close()
    result = {
        "command": "python bench/gpu_sdxl_lora.py" + ("" if args.model == "sdxl" else f" --model {args.model}"),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "model": args.model, "resolution": args.resolution, "batch_size": 1, "rank": 16,
        "precision": "bf16 autocast" if cuda else "fp32", "gradient_checkpointing": True,
        "timed_steps": args.steps, "seconds": seconds, "samples_per_second": args.steps / seconds,
        "peak_vram_gib": peak,
        "final_loss": losses[-1], "lora_layers": len(trainer.network.loras),
    }
    print(json.dumps(result, indent=2))
    if not args.no_results:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
