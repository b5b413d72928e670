"""SDXL at full size on the CPU: a random-weight single file in the A1111/ComfyUI layout loads, trains
one LoRA step, and round-trips bit-exactly (issue 13).

1. Build SDXL base 1.0 from the shipped configs (models/configs/sdxl) with random fp16 weights, without
   ever holding an fp32 copy, and write it with difftune's single-file writer (SGM keys).
2. `difftune train` on that file (model.family = auto: detection from the keys), LoRA rank 4 on the
   attention layers, 64-px images, one step: the file loads offline with the shipped configs and both
   tokenizers, and the step runs.
3. The loaded model is written again and compared with the first file tensor by tensor.

Needs ~21 GB of RAM at its peak (the fp16 file read into memory while the fp32 model is built) and
~14 GB of disk. Results: bench/results/sdxl_single_file.json.

    python bench/sdxl_single_file.py [--work bench/work/sdxl]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "sdxl_single_file.json"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def random_sdxl_file(path: Path) -> dict:
    """Write SDXL with random fp16 weights (std 0.02; norm weights 1) in the SGM single-file layout."""
    from difftune.config.schema import ModelConfig
    from difftune.models import weightless_model
    from difftune.models.single_file_io import shipped_config_dir

    model = weightless_model(ModelConfig(path=str(shipped_config_dir("sdxl"))))  # meta tensors: no memory yet
    generator = torch.Generator().manual_seed(0)
    counts = {}
    for role, module in model.parts.items():
        state = {}
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                state[name] = torch.arange(tensor.shape[-1]).expand(tensor.shape).clone()
            elif "norm" in name and name.endswith(".weight"):
                state[name] = torch.ones(tensor.shape, dtype=torch.float16)
            else:
                state[name] = (torch.randn(tensor.shape, generator=generator) * 0.02).to(torch.float16)
        module.load_state_dict(state, assign=True, strict=True)
        counts[role] = sum(p.numel() for p in module.parameters())
    started = time.perf_counter()
    model.save_single_file(path, dtype=torch.float16)
    return {"parameters": counts, "file_bytes": path.stat().st_size, "write_seconds": time.perf_counter() - started}


def digits(folder: Path, size: int) -> None:
    from difftune.demo import export_digits

    if not folder.is_dir():
        export_digits(folder / "1_digits", size=size, limit=4)


def compare_files(a: Path, b: Path) -> dict:
    from safetensors import safe_open

    differ, compared = [], 0
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        keys_a, keys_b = set(fa.keys()), set(fb.keys())
        for key in sorted(keys_a & keys_b):
            compared += 1
            if not torch.equal(fa.get_tensor(key), fb.get_tensor(key)):
                differ.append(key)
    return {"tensors_compared": compared, "tensors_differing": len(differ), "first_differing": differ[:5],
            "only_in_first": sorted(keys_a - keys_b)[:5], "only_in_second": sorted(keys_b - keys_a)[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="bench/work/sdxl", help="scratch folder (default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=64, help="training side length (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = {"command": "python bench/sdxl_single_file.py", "resolution": args.resolution}
    first = work / "sdxl-random.safetensors"
    result["build"] = random_sdxl_file(first)

    from difftune.config.loading import validate_config
    from difftune.training.loop import Trainer

    digits(work / "data", args.resolution)
    config = validate_config({
        "model": {"path": str(first)},
        "data": {"train_dir": str(work / "data"), "resolution": args.resolution, "val_split": 0.0},
        "network": {"type": "lora", "rank": 4, "preset": "attn-only"},
        "train": {"batch_size": 1, "max_steps": 1, "lr": 1e-4},
        "validation": {"every_n_epochs": 0},
        "output": {"dir": str(work / "run"), "overwrite": True, "tensorboard": False, "save_state": False},
    }, "bench/sdxl_single_file.py")
    started = time.perf_counter()
    trainer = Trainer(config, show_progress=False)
    result["load_seconds"] = time.perf_counter() - started
    result["detected"] = {"family": trainer.model.family, "prediction_type": trainer.model.prediction_type}
    started = time.perf_counter()
    group = next(trainer.step_groups())
    result["step_loss"] = trainer.train_step(group)
    result["step_seconds"] = time.perf_counter() - started
    result["lora_layers"] = len(trainer.network.loras)
    trainer.network.detach()
    second = work / "sdxl-reexported.safetensors"
    trainer.model.save_single_file(second, dtype=torch.float16)
    trainer.close()
    result["round_trip"] = compare_files(first, second)
    result["round_trip_bit_exact"] = (result["round_trip"]["tensors_differing"] == 0
                                      and not result["round_trip"]["only_in_first"]
                                      and not result["round_trip"]["only_in_second"])
    result["peak_rss_gib"] = peak_rss_gib()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work / "run", ignore_errors=True)


if __name__ == "__main__":
    main()
