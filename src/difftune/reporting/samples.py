"""Sample grids: every prompt rendered with a fixed seed, so grids from different steps compare."""

from __future__ import annotations

import contextlib
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from difftune.config.schema import SampleConfig
from difftune.models.base import DiffusionModel

CELL_MIN = 128


@torch.no_grad()
def render_samples(model: DiffusionModel, sample: SampleConfig, resolution: int) -> list[Image.Image]:
    pipe = model.pipeline(sample.sampler)
    modules = list(model.parts.values())
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        images = []
        for i, prompt in enumerate(sample.prompts):
            generator = torch.Generator("cpu").manual_seed(sample.seed + i)
            with _decode_in_vae_dtype(model.parts["vae"]):
                result = pipe(
                    prompt,
                    negative_prompt=sample.negative_prompt or None,
                    num_inference_steps=sample.steps,
                    guidance_scale=sample.cfg_scale if sample.cfg_scale is not None else model.default_cfg_scale,
                    height=sample.height or resolution,
                    width=sample.width or resolution,
                    generator=generator,
                    **model.pipeline_kwargs(),
                )
            images.append(result.images[0])
        return images
    finally:
        for m, training in zip(modules, was_training, strict=True):
            m.train(training)


@contextlib.contextmanager
def _decode_in_vae_dtype(vae):
    """Pipelines give the VAE latents in the denoiser's dtype; a VAE stored otherwise (model.vae_precision =
    fp32 beside a bf16 model, kohya's no_half_vae) would meet mixed dtypes. The latents are cast to the
    VAE's dtype as it is at decode time (SDXL's pipeline upcasts an fp16 VAE itself); equal dtypes: no-op."""
    own = vae.__dict__.get("decode")
    decode = vae.decode

    def cast(latents, *args, **kwargs):
        return decode(latents.to(vae.dtype), *args, **kwargs)

    vae.decode = cast
    try:
        yield
    finally:
        if own is None:
            del vae.decode
        else:
            vae.decode = own


def make_grid(images: list[Image.Image], prompts: list[str], title: str, columns: int = 4) -> Image.Image:
    """Images upscaled to at least 128 px (nearest, so pixels stay visible) with their prompts below."""
    scale = max(1, -(-CELL_MIN // max(1, images[0].width)))
    cell_w, cell_h = images[0].width * scale, images[0].height * scale
    label_h = 40
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * cell_w, rows * (cell_h + label_h) + 20), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 4), title, fill="black")
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        x, y = (i % columns) * cell_w, 20 + (i // columns) * (cell_h + label_h)
        grid.paste(image.resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y))
        label = "\n".join(textwrap.wrap(prompt, width=max(10, cell_w // 7))[:3])
        draw.text((x + 2, y + cell_h + 2), label, fill="black")
    return grid


def write_sample_grid(model: DiffusionModel, sample: SampleConfig, resolution: int, path: Path,
                      title: str) -> list[Image.Image]:
    """Render the prompts and write their grid to `path`; returns the images."""
    images = render_samples(model, sample, resolution)
    from difftune.checkpoint.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        make_grid(images, sample.prompts, title).save(tmp, format="PNG")
    return images
