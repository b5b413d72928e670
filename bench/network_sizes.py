"""Trainable parameters and saved file size of every LoRA-family network type, with difftune's defaults.

Two models: the built-in `tiny-sd` and the SD 1.5 architecture built from the configs difftune ships
(src/difftune/models/configs/sd1) with random weights; nothing is downloaded. Two scopes: the UNet
only (difftune's default, `train.train_text_encoder = false`) and UNet + text encoder.

Each number is obtained twice, and the two must agree:
- counted: `difftune.network.facts.network_facts`, what `difftune doctor` prints, which attaches the
  network to a weightless (meta-device) copy of the model and sizes the file from the tensor shapes;
- measured: the network built on real (random) weights, exported with the trainer's own export path
  (`LoraFamilyNetwork.export`, kohya layout) and the written file's size read from disk.
The base model is built once per model; each network is built beside it (not attached) and dropped.

    python bench/network_sizes.py [--models tiny-sd sd1 sd2 sd2-v] [--no-measure] [--out NAME]

Writes bench/results/network_sizes.json and .md (or NAME.json/.md); the markdown table also goes to stdout. Files are
written under bench/work/ (gitignored) and deleted after measuring.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from difftune import __version__
from difftune.config.loading import validate_config
from difftune.config.schema import Config
from difftune.models import weightless_model
from difftune.models.base import DiffusionModel
from difftune.models.single_file_io import shipped_config_dir
from difftune.network.base import roles_to_train
from difftune.network.facts import network_facts
from difftune.network.lycoris_net import LoraFamilyNetwork, NetworkSettings

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
WORK = ROOT / "work" / "network_sizes"

# label → network section: every type with difftune's defaults (nothing but the type is set), and DoRA
# for the types LyCORIS decomposes.
VARIANTS: dict[str, dict[str, Any]] = {
    **{t: {"type": t} for t in ("lora", "locon", "loha", "lokr", "dylora", "ia3", "glora", "glokr", "diag-oft",
                                "boft", "full")},
    **{f"{t}+dora": {"type": t, "dora": True} for t in ("lora", "locon", "loha", "lokr")},
}
SCOPES = {"unet": False, "unet+te": True}  # label → train.train_text_encoder
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}  # fp32 is difftune's output.save_precision default
TITLES = {"tiny-sd": "tiny-sd (built-in)", "sd1": "SD 1.5 architecture (shipped sd1 config, random weights)",
          "sd2": "SD 2.x-base architecture (shipped sd2 config, random weights)",
          "sd2-v": "SD 2.x 768-v architecture (shipped sd2-v config, random weights)"}


def model_path(name: str) -> str:
    # A diffusers folder holding only configs: the facts read it without weights, and the measured
    # build below fills the same architecture with random weights.
    return name if name == "tiny-sd" else str(shipped_config_dir(name))


def make_config(model: str, network: dict[str, Any], train_text_encoder: bool, precision: str) -> Config:
    return validate_config(
        {
            "model": {"path": model_path(model)},
            "network": network,
            "train": {"train_text_encoder": train_text_encoder},
            "output": {"dir": str(WORK / "run"), "save_precision": precision, "lora_format": "kohya"},
        },
        "bench/network_sizes.py",
    )


def real_architecture(model: str, meta: DiffusionModel) -> DiffusionModel:
    """The model with random weights (UNet and text encoder only: the VAE carries no network and stays
    weightless)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    if model == "tiny-sd":
        from difftune.models.sd.tiny import tiny_text_encoder, tiny_unet

        unet, text = tiny_unet(), tiny_text_encoder()
    else:
        folder = shipped_config_dir(model)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        text = CLIPTextModel(CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json"))
    return dataclasses.replace(meta, unet=unet.eval(), text_encoder=text.eval())


def step0_run_metadata(config: Config) -> dict[str, str]:
    """The trainer metadata `LoraFamilyNetwork.file_bytes` sizes the file with (a step-0 save)."""
    return {"step": "0", "epoch": "0", "difftune_version": __version__, "base_model": config.model.path,
            "resolution": str(config.data.resolution), "train_images": "0", "train_samples": "0",
            "planned_epochs": str(config.train.max_epochs)}


def measure(architecture: DiffusionModel, config: Config) -> dict[str, Any]:
    """Build the network on real weights, export it as training does, and read the file sizes."""
    settings = NetworkSettings.from_config(config.network)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        network = LoraFamilyNetwork.build(architecture, settings, roles_to_train(architecture, config), attach=False,
                                          config=config)
    out = {"trainable_parameters": sum(p.numel() for p in network.net.parameters() if p.requires_grad),
           "layers": len(network.loras)}
    for name, dtype in PRECISIONS.items():
        folder = WORK / f"export-{name}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        network.export(folder, architecture, step0_run_metadata(config), dtype)
        (file,) = folder.glob("*.safetensors")
        out[f"file_bytes_{name}"] = file.stat().st_size
        shutil.rmtree(folder)
    del network
    gc.collect()
    return out


def run_model(model: str, measure_files: bool) -> dict[str, Any]:
    started = time.perf_counter()
    meta = weightless_model(make_config(model, {"type": "lora"}, False, "fp32").model)
    real = real_architecture(model, meta) if measure_files else None
    built_s = time.perf_counter() - started
    rows: dict[str, dict[str, Any]] = {}
    for scope, with_te in SCOPES.items():
        for label, network in VARIANTS.items():
            t0 = time.perf_counter()
            row: dict[str, Any] = {}
            for precision in PRECISIONS:
                config = make_config(model, network, with_te, precision)
                facts = network_facts(config, meta)
                row.update(layers=facts["layers"], trainable_parameters=facts["trainable_parameters"])
                row[f"file_bytes_{precision}"] = facts["file_bytes"]
            settings = NetworkSettings.from_config(config.network).to_dict()
            row["settings"] = {k: v for k, v in settings.items() if v not in (None, False, 0.0) and k != "lycoris_algo"}
            if real is not None:
                row["measured"] = measured = measure(real, config)
                row["counted_equals_measured"] = all(measured[k] == row[k] for k in measured)
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows[f"{scope}/{label}"] = row
            print(f"  {model} {scope:8s} {label:12s} {row['trainable_parameters']:>13,} params "
                  f"{row['file_bytes_fp16'] / 2**20:9.2f} MiB fp16  ({row['seconds']} s)"
                  + ("" if real is None else f"  counted == measured: {row['counted_equals_measured']}"), flush=True)
    return {"model_build_seconds": round(built_s, 1), "seconds": round(time.perf_counter() - started, 1), "rows": rows}


def markdown(results: dict[str, Any]) -> str:
    lines = []
    for model, data in results["models"].items():
        title = TITLES[model]
        lines += [f"### {title}", "",
                  "| network | preset | settings | layers (UNet / +TE) | params UNet | MiB fp32 / fp16 | params UNet+TE | MiB fp32 / fp16 |",
                  "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
        for label in VARIANTS:
            unet, both = data["rows"][f"unet/{label}"], data["rows"][f"unet+te/{label}"]
            settings = dict(unet["settings"])
            settings.pop("type"), settings.pop("dora", None)
            preset = settings.pop("preset")
            shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())
            lines.append(
                f"| {label} | {preset} | {shown or '-'} | {unet['layers']} / {both['layers']} | "
                f"{unet['trainable_parameters']:,} | {_mib(unet)} | {both['trainable_parameters']:,} | {_mib(both)} |"
            )
        lines.append("")
    return "\n".join(lines)


def _mib(row: dict[str, Any]) -> str:
    return f"{row['file_bytes_fp32'] / 2**20:.2f} / {row['file_bytes_fp16'] / 2**20:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-sd", "sd1"], choices=["tiny-sd", "sd1", "sd2", "sd2-v"])
    parser.add_argument("--no-measure", action="store_true", help="count only (weightless), write no files")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (keep the machine usable)")
    parser.add_argument("--out", default="network_sizes", help="result name under bench/results/ (.json, .md)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "what": "trainable parameters and kohya-layout .safetensors size per network type, difftune defaults",
        "defaults": "rank 16, alpha = rank; conv_rank/conv_alpha = rank/alpha under preset 'full'; LoKr factor -1; "
                    "Diag-OFT block_size 8; BOFT block_size 16; DyLoRA block_size 4; dropouts 0; preset per type (attn-mlp: lora, full; "
                    "ia3: ia3; full: the others); output.save_precision fp32 (default) and fp16",
        "file_size": "counted from tensor shapes by network_facts (what doctor prints) and, unless --no-measure, "
                     "measured on disk after LoraFamilyNetwork.export on random weights; metadata of a step-0 save",
        "difftune_version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "models": {},
    }
    for model in args.models:
        print(f"{model}:", flush=True)
        results["models"][model] = run_model(model, not args.no_measure)
    results["seconds"] = round(time.perf_counter() - started, 1)
    table = markdown(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / f"{args.out}.md").write_text(
        "# Network sizes (bench/network_sizes.py)\n\n"
        f"{results['defaults']}.\nSizes in MiB (2^20 bytes), {results['file_size']}.\n\n{table}")
    print()
    print(table)
    print(f"total {results['seconds']} s")


if __name__ == "__main__":
    main()
