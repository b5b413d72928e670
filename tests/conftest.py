"""Shared fixtures: small real datasets (scikit-learn's digits) and quick configs for the tiny model."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["DIFFTUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="difftune-tests-cache-")  # not the user's ~/.cache
warnings.filterwarnings("ignore")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """48 handwritten digits as 16-px PNGs with captions, in a kohya-style `2_digits` folder (repeats 2)."""
    from difftune.demo import export_digits

    root = tmp_path_factory.mktemp("digits")
    export_digits(root / "2_digits", size=16, limit=48)
    return root


def quick_config_dict(train_dir: Path, out_dir: Path, **sections) -> dict:
    """A config that trains the tiny model for a few steps at 16 px on a CPU in seconds."""
    config = {
        "model": {"path": "tiny-sd"},
        "data": {"train_dir": str(train_dir), "resolution": 16, "val_split": 0.25},
        "train": {"batch_size": 4, "lr": 1e-3, "max_steps": 6, "seed": 7},
        "validation": {"every_n_steps": 3, "seed": 11, "batch_size": 16},
        "output": {"dir": str(out_dir), "tensorboard": False},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


@pytest.fixture
def quick_config(digits_dir, tmp_path):
    from difftune.config.loading import validate_config

    def make(**sections):
        return validate_config(quick_config_dict(digits_dir, tmp_path / "run", **sections), "test")

    return make


@pytest.fixture
def one_thread():
    """The tiny models' ops are too small to split across threads: on 2 shared cores intra-op threads
    spin against other processes and a step takes many times longer. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def interrupted_then_resumed(config, save_name: str, run_dir) -> None:
    """Train `config`, crash right after the save `save_name` (KeyboardInterrupt, as a kill would leave it),
    then continue with --resume: what resume tests compare with an uninterrupted run."""
    import pytest as _pytest

    from difftune.training import loop

    original = loop.Trainer._save

    def crash_after(self, name, **kwargs):
        original(self, name, **kwargs)
        if name == save_name:
            raise KeyboardInterrupt

    loop.Trainer._save = crash_after
    try:
        with _pytest.raises(KeyboardInterrupt):
            loop.train(config, show_progress=False)
    finally:
        loop.Trainer._save = original
    loop.train(config, resume=run_dir, show_progress=False)


def unet_outputs(model):
    """The denoiser's output for fixed latents, timesteps and prompts (the text encoder included): two models
    or one model before and after give equal outputs exactly when their weights act the same."""
    import torch

    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(2, 4, 8, 8, generator=generator)
        conditioning = model.encode_text(["a handwritten 3", "a handwritten 7"])
        return model.predict(latents, torch.tensor([50, 700]), conditioning)
