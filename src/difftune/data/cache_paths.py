"""Where a run's disk caches live: one fact, read by the trainer, doctor, the tuners and the check
that no run writes into its own dataset (training/plan.py). No heavy import here."""

from __future__ import annotations

from pathlib import Path

DEFAULT_LATENT_FOLDER = "latent_cache"


def latent_cache_folder(data, output_dir: str | Path) -> Path | None:
    """The disk latent cache (None unless data.cache_latents = "disk"): data.latent_cache_dir, else
    <output.dir>/latent_cache."""
    if data.cache_latents != "disk":
        return None
    return Path(data.latent_cache_dir) if data.latent_cache_dir else Path(output_dir) / DEFAULT_LATENT_FOLDER
