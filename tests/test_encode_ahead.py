"""data.encode_ahead: the next batch's VAE (and frozen text) encoding runs in a background thread while
the step trains, and training is the same to the bit as encoding in the step (the same batch through
the same kernels; the latent sample is still drawn by the step's generator)."""

from __future__ import annotations

import threading

import pytest
import torch

from difftune.training.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def run(trainer: Trainer, steps: int):
    try:
        groups = trainer.step_groups()
        losses = [trainer.train_step(next(groups)) for _ in range(steps)]
        return losses, trainer.validate()["val_loss"], {k: v.clone() for k, v in trainer.network.state_dict().items()}
    finally:
        trainer.close()


def threads_of(module: torch.nn.Module) -> list[str]:
    names: list[str] = []
    module.register_forward_hook(lambda *_: names.append(threading.current_thread().name))
    return names


@pytest.mark.parametrize("path, data", [("tiny-sd", {}), ("tiny-sdxl", {"cache_latents": "memory"})])
def test_encoding_ahead_trains_exactly_as_encoding_in_the_step(quick_config, path, data):
    common = {"model": {"path": path}, "network": {"type": "lora", "rank": 4}, "train": {"batch_size": 4}}
    ahead = Trainer(quick_config(**common, data={**data, "encode_ahead": True}), show_progress=False)
    inline = Trainer(quick_config(**common, data={**data, "encode_ahead": False},
                                  output={"dir": str(ahead.run_dir.root) + "-inline"}), show_progress=False)
    assert ahead.encode_ahead is not None and inline.encode_ahead is None
    vae_threads, text_threads = threads_of(ahead.model.parts["vae"].encoder), threads_of(ahead.model.parts["text_encoder"])
    a, b = run(ahead, 4), run(inline, 4)
    assert a[0] == b[0] and a[1] == b[1]
    assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])
    text_in_worker = [n for n in text_threads if n.startswith("difftune-encode-ahead")]
    assert len(text_in_worker) >= 3  # every step's text but an epoch's first came from the worker
    if "cache_latents" not in data:
        assert sum(n.startswith("difftune-encode-ahead") for n in vae_threads) >= 3


def test_auto_encodes_ahead_on_the_cpu_and_not_with_a_text_cache_and_cached_latents(quick_config):
    trainer = Trainer(quick_config(), show_progress=False)
    trainer.close()
    assert trainer.encode_ahead is not None and trainer.encode_ahead.encode_text
    trainer = Trainer(quick_config(data={"cache_latents": "memory", "cache_text_embeddings": True}), show_progress=False)
    trainer.close()
    assert trainer.encode_ahead is None  # nothing left to encode
