"""`difftune sample`: images from a model (and optionally a LoRA-family file) from the command line.

It renders with the same code as the training samples (reporting/samples.py: same pipeline, sampler
names and per-prompt seeds), so an image made here matches the grid cell the run produced.
"""

from __future__ import annotations

from pathlib import Path

from difftune.config.schema import ModelConfig, SampleConfig


def generate(model_path: str, prompts: list[str], out: str | Path, *, lora: str | None = None, scale: float = 1.0,
             embeddings: list[str] | None = None,
             seed: int = 0, steps: int = 20, cfg_scale: float | None = None, sampler: str = "euler", negative_prompt: str = "",
             width: int | None = None, height: int | None = None, clip_skip: int = 1,
             model_settings: dict | None = None, log=print) -> list[Path]:
    """Render each prompt (seed, seed+1, ...) and save PNGs: `out` for one prompt, `out` with -N suffixes
    for several, plus a grid `out` when there are several. Returns the written paths.

    `embeddings`: textual-inversion files (token: the one difftune trained it with, else the file name);
    a LoRA file with bundled embeddings (pivotal tuning) brings its own."""
    import torch
    from pydantic import ValidationError

    from difftune.config.loading import ConfigError, format_validation_error
    from difftune.models import load_model
    from difftune.reporting.samples import make_grid, render_samples

    try:  # the flags are checked like config keys, with the same messages
        model_config = ModelConfig(**{"path": model_path, "clip_skip": clip_skip, **(model_settings or {})})
        sample = SampleConfig(prompts=prompts, seed=seed, steps=steps, cfg_scale=cfg_scale, sampler=sampler,
                              negative_prompt=negative_prompt, width=width, height=height)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "difftune sample")) from None
    model = load_model(model_config)
    words: list[tuple[str, str]] = []
    if lora is not None:
        from difftune.network.lycoris_net import load_lora_file
        from difftune.network.textual_inversion import load_bundled_embeddings, missing_bundle_note

        load_lora_file(model, lora, multiplier=scale)
        words += [(f"{lora} (bundled)", ti.token) for ti in load_bundled_embeddings(model, lora)]
        if note := missing_bundle_note(lora):
            log(f"note: {note}")
    for path in embeddings or []:
        from difftune.network.textual_inversion import load_embedding_file

        words.append((path, load_embedding_file(model, path).token))
    for source, word in words:
        used = any(word.lower() in p.lower() for p in prompts)
        log(f"embedding {source}: write '{word}' in the prompt" + ("" if used else " (no prompt has it: it changes nothing)"))
    resolution = model.native_resolution
    with torch.no_grad():
        images = render_samples(model, sample, resolution)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        images[0].save(out)
        return [out]
    written = []
    for i, image in enumerate(images):
        path = out.with_name(f"{out.stem}-{i}{out.suffix}")
        image.save(path)
        written.append(path)
    title = f"{Path(model_path).name}" + (f" + {Path(lora).name} x{scale:g}" if lora else "") + f"  seed {seed}"
    make_grid(images, prompts, title).save(out)
    return [out, *written]
