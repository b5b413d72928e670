"""Full-size check of single-file loading: SD 1.5 / SD 2.x architectures with random weights.

Builds each family's UNet, VAE and text encoder from difftune's shipped configs, writes them as one
original-layout .safetensors (what A1111/ComfyUI share), loads that file back through
`difftune.models.load_model` (family detection, shipped configs, offline tokenizer) and checks every
tensor matches. Too heavy for the test suite (~1 B parameters per family); run by hand:

    python bench/single_file_roundtrip.py [sd1 sd2-v sd2]

Writes bench/results/single_file_roundtrip.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from difftune.config.schema import ModelConfig
from difftune.models import load_model
from difftune.models.sd.ldm_export import save_single_file
from difftune.models.single_file_io import shipped_config_dir


def build(family: str):
    folder = shipped_config_dir(family)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    return unet, vae, text_encoder


def check(family: str, workdir: Path) -> dict:
    started = time.perf_counter()
    modules = dict(zip(("unet", "vae", "text_encoder"), build(family), strict=True))
    file = workdir / f"{family}.safetensors"
    save_single_file(file, **modules, dtype=torch.float16)
    size_mb = file.stat().st_size / 2**20
    # SD 2.x-base files are only told apart from 768-v ones by their training step; name the family.
    model = load_model(ModelConfig(path=str(file), family="sd2" if family == "sd2" else "auto"))
    loaded = {"unet": model.unet, "vae": model.vae, "text_encoder": model.parts["text_encoder"]}
    mismatched = []
    for name, module in modules.items():
        theirs = loaded[name].state_dict()
        for key, value in module.state_dict().items():
            if value.is_floating_point() and not torch.equal(value.half(), theirs[key].half()):
                mismatched.append(f"{name}.{key}")
    ids = model.tokenizer("a photo of a cat").input_ids
    file.unlink()
    return {
        "family": family,
        "detected_family": model.family,
        "prediction_type": model.prediction_type,
        "parameters": {n: sum(p.numel() for p in m.parameters()) for n, m in modules.items()},
        "file_mb_fp16": round(size_mb, 1),
        "mismatched_tensors": mismatched,
        "tokenizer_ids": ids,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(families: list[str]) -> None:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            result = check(family, Path(tmp))
            print(json.dumps(result))
            results.append(result)
    out = Path(__file__).parent / "results" / "single_file_roundtrip.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", default=["sd1", "sd2-v", "sd2"], choices=["sd1", "sd2-v", "sd2"],
                        help="families to check (default: all three)")
    main(parser.parse_args().families)
