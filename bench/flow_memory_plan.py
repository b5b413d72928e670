"""Full-size Flux.1 and SD3.5 architectures on the meta device (random weights, nothing downloaded):
what `difftune doctor` reports for a LoRA on each — parameters, the LoRA's size and the GPU memory
budget for bf16 / fp8 / fp8 + block swap base weights.

    python bench/flow_memory_plan.py          # writes bench/results/flow_memory_plan.json and .md

The budget counts every part in the dtype the trainer stores it in, on a weightless copy (the same
code `difftune doctor` runs); activations are not included (bench/gpu_flux_lora.py measures the peak).
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

from PIL import Image

from difftune import __version__
from difftune.config.loading import validate_config
from difftune.doctor import diagnose
from difftune.models.single_file_io import shipped_config_dir

RESULTS = Path(__file__).parent / "results"
MODELS = ("flux-dev", "flux-schnell", "sd3.5-large", "sd3.5-medium")
SETTINGS = {"bf16": {"base_precision": "bf16"}, "fp8": {"base_precision": "fp8"},
            "fp8 + swap half the blocks": {"base_precision": "fp8", "swap": 0.5}}
GIB = 2**30


def config_for(model: str, setting: dict, data: Path, blocks: int | None):
    swap = int(blocks * setting["swap"]) if blocks and "swap" in setting else 0
    return validate_config({
        "model": {"path": str(shipped_config_dir(model)), "base_precision": setting["base_precision"]},
        "data": {"train_dir": str(data), "resolution": 1024},
        "network": {"type": "lora", "rank": 16, "alpha": 16},
        "train": {"mixed_precision": "bf16", "gradient_checkpointing": True, "blocks_to_swap": swap},
    }, "bench/flow_memory_plan.py"), swap


def main() -> None:
    from difftune.models import weightless_model

    rows, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        for i in range(4):
            Image.new("RGB", (1024, 1024), (60 * i, 90, 120)).save(data / f"{i}.png")
            (data / f"{i}.txt").write_text("a photo of sks")
        for model in MODELS:
            probe, _ = config_for(model, SETTINGS["bf16"], data, None)
            architecture = weightless_model(probe.model)
            blocks = len(architecture.denoiser_blocks())
            parameters = {role: sum(p.numel() for p in m.parameters()) for role, m in architecture.parts.items()}
            for label, setting in SETTINGS.items():
                config, swap = config_for(model, setting, data, blocks)
                report = diagnose(config)
                budget = report["memory_budget"]
                rows.append({
                    "model": model, "setting": label, "blocks_to_swap": swap, "blocks": blocks,
                    "parameters": parameters, "lora_parameters": report["network"]["trainable_parameters"],
                    "lora_file_mib": report["network"]["file_bytes"] / 2**20, "lora_layers": report["network"]["layers"],
                    "budget_gib": {k: v / GIB for k, v in budget["bytes"].items()},
                    "total_before_activations_gib": budget["total_bytes"] / GIB, "notes": budget["notes"],
                })
                print(f"{model:13s} {label:28s} {budget['total_bytes'] / GIB:6.2f} GiB before activations")
    result = {"command": "python bench/flow_memory_plan.py", "difftune_version": __version__,
              "machine": platform.platform(), "seconds": time.perf_counter() - started,
              "setup": "LoRA rank 16 (attn-mlp preset), bf16 autocast, gradient checkpointing, cached text embeddings "
                       "with the encoders on the CPU (auto for these families), AdamW, 1024 px",
              "excludes": "activations", "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "flow_memory_plan.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Flux.1 / SD3.5 LoRA memory budget (bench/flow_memory_plan.py)", "",
             f"{result['setup']}. Counted by `difftune doctor` on the meta device; activations are not included.", "",
             "| model | base weights | transformer params | LoRA params | LoRA file | denoiser on GPU | VAE | LoRA + grads + AdamW | total before activations |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["budget_gib"]
        trained = b["trained weights"] + b["gradients"] + b["optimizer state"]
        setting = r["setting"].replace("half the blocks", f"{r['blocks_to_swap']} of {r['blocks']} blocks")
        lines.append(f"| {r['model']} | {setting} | {r['parameters']['denoiser'] / 1e9:.2f} B | "
                     f"{r['lora_parameters'] / 1e6:.1f} M | {r['lora_file_mib']:.0f} MiB | {b['denoiser']:.2f} GiB | "
                     f"{b['vae']:.2f} GiB | {trained:.2f} GiB | {r['total_before_activations_gib']:.2f} GiB |")
    (RESULTS / "flow_memory_plan.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
