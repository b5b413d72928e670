"""What the GPU benchmarks share: full-size architectures with random weights built on a device, a
small image folder, and the timed training steps.

The weightless (meta-device) model from the shipped configs gets storage on the device and normal
random values (norm scales 1, integer position ids counted up), so nothing is downloaded and no fp32
copy of a multi-GB model passes through host memory.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def randomise(model, device: str, seed: int = 0):
    generator = torch.Generator(device=device).manual_seed(seed)
    for module in model.parts.values():
        module.to_empty(device=device)
        with torch.no_grad():
            for name, param in module.named_parameters():
                if "norm" in name and name.endswith(".weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=generator)
            for buffer in module.buffers():
                if not buffer.is_floating_point():  # position ids
                    buffer.copy_(torch.arange(buffer.shape[-1], device=device).expand(buffer.shape))
    return model


def random_model(variant: str, device: str):
    """A shipped architecture (`sdxl`, `flux-dev`, `sd3.5-large`, ...) with random weights on `device`,
    with tokenizers that need no vocabulary file (token ids only need to be valid for the embeddings)."""
    from difftune.config.schema import ModelConfig
    from difftune.models import weightless_model
    from difftune.models.clip_tokenizers import byte_level_clip_tokenizer
    from difftune.models.single_file_io import shipped_config_dir
    from difftune.models.t5_text import tiny_t5_tokenizer

    model = randomise(weightless_model(ModelConfig(path=str(shipped_config_dir(variant)))), device)
    for attribute in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if not hasattr(model, attribute):
            continue
        encoder = model.parts.get({"tokenizer": "text_encoder"}.get(attribute, attribute.replace("tokenizer", "text_encoder")))
        is_t5 = encoder is not None and type(encoder).__name__.startswith("T5")
        setattr(model, attribute, tiny_t5_tokenizer(getattr(model, "max_sequence_length", 512)) if is_t5
                else byte_level_clip_tokenizer())
    return model


def write_images(folder: Path, resolution: int, count: int = 8) -> None:
    """`count` random RGB images with captions (the benchmarks measure speed and memory, not learning)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = (rng.random((resolution, resolution, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of sks object number {i}")


def timed_steps(trainer, steps: int, warmup: int = 3) -> tuple[list[float], float, float | None]:
    """(losses, seconds, peak GiB) of `steps` training steps after `warmup` (allocator, kernels); the
    peak covers the timed steps only (None without CUDA)."""
    cuda = torch.cuda.is_available()
    groups = trainer.step_groups()
    for _ in range(warmup):
        trainer.train_step(next(groups))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    losses = [trainer.train_step(next(groups)) for _ in range(steps)]
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return losses, seconds, torch.cuda.max_memory_allocated() / 2**30 if cuda else None
