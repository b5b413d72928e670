"""Text-encoder outputs computed once per caption and reused (data.cache_text_embeddings).

`DiffusionModel.encode_text(captions)` depends on the captions only, so while the encoders are frozen
the training step, the validation probe and the tuners' probes can read stored outputs instead of
running the encoders, and the encoders (T5-XXL: 9 GB in bf16) need not stay on the device. Each
caption's tensors are kept with batch dimension 1 on the CPU, in the dtype the encoders produced under
the run's autocast; a batch is their concatenation, moved to the device. The encoders run as in the
step (same device, dtype, autocast, no grad), so a batch from the cache equals the step's encoding
wherever the encoders' kernels do not depend on the batch's other rows (exact for tiny-sd on the CPU).

Captions are keyed by their exact text. A caption not seen yet is encoded when first asked for, with
the encoders brought to the device for it; captions that change every step (data.shuffle_tags) are
refused where the cache is configured (training/memory), so no step reads another text's embedding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch

from difftune.models.base import DiffusionModel, text_encoders

ENCODE_BATCH = 8
"""Captions per encoder call while filling the cache."""


class TextEmbeddingCache:
    def __init__(self, model: DiffusionModel, device: torch.device, autocast: Callable, offload: bool):
        """`offload`: the encoders live on the CPU and come to `device` only to encode (data.offload_encoders)."""
        self.model = model
        self.device = torch.device(device)
        self.autocast = autocast
        self.offload = offload
        self._store: dict[str, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, caption: str) -> bool:
        return caption in self._store

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for entry in self._store.values() for t in entry.values())

    def add(self, captions: Iterable[str], show_progress: bool = False) -> int:
        """Encode the captions not stored yet, in batches; returns how many were new."""
        new = list(dict.fromkeys(c for c in captions if c not in self._store))
        if not new:
            return 0
        from tqdm.auto import tqdm

        bar = tqdm(total=len(new), desc="text embeddings", unit="caption", disable=not show_progress)
        try:
            with self.encoders_on_device(), _eval(text_encoders(self.model)), torch.no_grad(), self.autocast():
                for start in range(0, len(new), ENCODE_BATCH):
                    chunk = new[start : start + ENCODE_BATCH]
                    self._keep(chunk, self.model.encode_text(chunk))
                    bar.update(len(chunk))
        finally:
            bar.close()
        return len(new)

    def lookup(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The text tensors of a batch of captions on the device, as `model.encode_text(captions)` gives them."""
        missing = [c for c in captions if c not in self._store]
        if missing:
            self.add(missing)
        entries = [self._store[c] for c in captions]
        return {key: torch.cat([e[key] for e in entries]).to(self.device) for key in entries[0]}

    def _keep(self, captions: list[str], text: dict[str, torch.Tensor]) -> None:
        for key, value in text.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != len(captions):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise TypeError(f"{type(self.model).__name__}.encode_text returned {key!r} with shape {shape} for "
                                f"{len(captions)} captions: the text cache needs every output batched by caption")
        for i, caption in enumerate(captions):
            # clone: a row of the batch would keep the whole batch's storage alive
            self._store[caption] = {key: value[i : i + 1].detach().to("cpu", copy=True) for key, value in text.items()}

    @contextlib.contextmanager
    def encoders_on_device(self):
        """The text encoders on the device for the duration (a no-op unless they are offloaded)."""
        if not self.offload or self.device.type == "cpu":
            yield
            return
        encoders = text_encoders(self.model)
        for module in encoders:
            module.to(self.device)
        try:
            yield
        finally:
            for module in encoders:
                module.to("cpu")


@contextlib.contextmanager
def _eval(modules: list[torch.nn.Module]):
    """Frozen encoders are in eval mode already; this makes sure (dropout would make the cache random)."""
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(modules, was, strict=True):
            m.train(training)
