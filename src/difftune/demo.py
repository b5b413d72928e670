"""The embedded default: scikit-learn's bundled handwritten digits as a captioned image folder, and a
config that trains the built-in tiny model on them on a CPU in a few minutes."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DEMO_CONFIG = "demo.toml"


def export_digits(folder: Path, size: int = 32, limit: int | None = None) -> int:
    """Write the 1,797 8x8 digits as `size`-pixel PNGs with captions ("a handwritten digit seven").

    Digits are white-on-black in scikit-learn; we keep that, upscaled smoothly. Returns the count.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    count = len(digits.images) if limit is None else min(limit, len(digits.images))
    for i in range(count):
        pixels = (digits.images[i] / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        stem = folder / f"digit_{i:04d}"
        image.save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(f"a handwritten digit {DIGIT_WORDS[digits.target[i]]}\n")
    return count


def prepare_base_model(folder: Path, images_dir: Path, steps: int = 200, seed: int = 0) -> Path:
    """Save the tiny model as a diffusers folder, its VAE first fitted to the digits.

    A random VAE decodes anything to noise, so sample grids would show nothing. Fitting only the VAE
    (a plain autoencoder objective, ~20 s on a CPU) makes samples readable while the UNet and text
    encoder stay random: the demo still shows a diffusion model learning from scratch.
    """
    import torch

    from difftune.data.records import scan_image_folder
    from difftune.data.transforms import load_image
    from difftune.models.sd.adapter import StableDiffusionModel
    from difftune.models.sd.tiny import build_tiny_components

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    parts = build_tiny_components("tiny-sd")
    vae = parts["vae"]
    pixels = torch.stack([load_image(r.path, 32) for r in scan_image_folder(images_dir)])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    vae.train()
    for _ in range(steps):
        batch = pixels[torch.randint(0, len(pixels), (32,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    vae.eval()
    with torch.no_grad():
        # SD scales latents to unit variance; do the same for this VAE.
        latents = vae.encode(pixels[:256]).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    StableDiffusionModel(family="tiny-sd", **parts).save_pretrained(folder)
    return folder


def demo_config_text() -> str:
    return resources.files("difftune.examples").joinpath(DEMO_CONFIG).read_text()
