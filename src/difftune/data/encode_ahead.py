"""The frozen encoders' work on the next batch while the current step trains (data.encode_ahead).

A step's VAE encoding (the latent distribution's mean and std: no random draw) and, with frozen text
encoders, its text encoding depend on the batch only, so they can run one batch ahead, in a background
thread, while the denoiser's forward and backward run in the main one: torch releases the GIL inside
its kernels, so on a CPU the two use two cores. The step then samples the latents from the stored
distribution with its own generator (data/latent_cache.py's path) and reads the stored text: the same
numbers, to the bit, as encoding in the step (the same batch through the same kernels), so training,
resume and the pinned losses are unchanged.

Only within an epoch: the first batch of an epoch (and of a resume) is encoded on demand, so the
epoch bookkeeping of Trainer.step_groups is untouched. The worker holds `lock` while it uses the
encoders; validation and samples take it too, so the two threads never run one module at once.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from difftune.data.batch import Batch


class EncodeAheadBatches:
    """TrainBatches' (or any batches') micro-batches, each with its latent distribution, and with
    `text` when the text encoders are frozen, encoded one batch ahead."""

    def __init__(self, batches, model, device: torch.device, autocast, encode_text: bool):
        self.batches = batches
        self.model = model
        self.device = device
        self.autocast = autocast
        self.encode_text = encode_text
        self.lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="difftune-encode-ahead")

    def __getattr__(self, name):  # dataset, batches_per_epoch, samples_per_epoch, epoch_keys, ...
        return getattr(self.batches, name)

    def epoch(self, epoch: int, start_batch: int = 0):
        source = iter(self.batches.epoch(epoch, start_batch))
        pending = self._pool.submit(self._next_encoded, source)
        while True:
            batch = pending.result()
            if batch is None:
                return
            pending = self._pool.submit(self._next_encoded, source)  # runs while the caller trains on batch
            yield batch

    def _next_encoded(self, source) -> Batch | None:
        batch = next(source, None)
        if batch is None:
            return None
        with self.lock, torch.no_grad():
            if batch.latent_mean is None:  # not cached (data/latent_cache.py)
                pixels = batch.pixels.to(self.device)
                batch.latent_mean, batch.latent_std = self.model.encode_latent_distribution(pixels)
            if self.encode_text:
                with self.autocast():
                    batch.text = self.model.encode_text(batch.captions)
        return batch  # pixels stay: what the step trains on is still there to look at

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
