"""Pivotal tuning (network.pivotal): a LoRA-family network and textual-inversion vectors trained together.

The new token carries the concept and the LoRA adapts the model around it (the name is from
cloneofsimo's lora and diffusers' advanced DreamBooth script). One export holds both:
- the LoRA file with the vectors inside as kohya's `bundle_emb.<token>.*` keys: A1111 and Forge load the
  embedding with the LoRA (write the token in the prompt);
- the embedding file `<token>.safetensors` next to it: ComfyUI (its LoRA loader skips bundle_emb keys)
  and diffusers (`load_textual_inversion`; its `load_lora_weights` refuses bundle_emb keys, so diffusers
  users load the diffusers-layout LoRA file, output.lora_format = "diffusers" or "both", which has none).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from difftune.checkpoint import lora_formats as formats
from difftune.models.base import DiffusionModel
from difftune.network.lycoris_net import LoraFamilyNetwork
from difftune.network.textual_inversion import STATE_PREFIX, TextualInversion, read_embedding_file


class PivotalNetwork:
    """The TrainableNetwork of a LoraFamilyNetwork and a TextualInversion side by side."""

    def __init__(self, lora: LoraFamilyNetwork, ti: TextualInversion):
        self.lora, self.ti = lora, ti

    @classmethod
    def for_training(cls, model: DiffusionModel, config) -> PivotalNetwork:
        network = config.network
        vectors, note = bundled_vectors(model, network.init_from, network.token, network.num_vectors)
        ti = TextualInversion.build(model, network.token, network.num_vectors, network.init_word, config=config,
                                    vectors=vectors)
        ti.notes += [note] if note else []
        lora = LoraFamilyNetwork.for_training(model, config)  # freezes the model's parts, trains its own
        ti.module.requires_grad_(True)
        return cls(lora, ti)

    @property
    def notes(self) -> list[str]:
        return self.lora.notes + self.ti.notes

    def param_groups(self, lrs: dict[str, float]) -> list[dict[str, Any]]:
        return self.lora.param_groups(lrs) + self.ti.param_groups(lrs)

    def trained_roles(self) -> list[str]:
        return self.lora.trained_roles() + self.ti.trained_roles()

    def trained_modules(self) -> list[torch.nn.Module]:
        return self.lora.trained_modules() + self.ti.trained_modules()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.lora.state_dict(), **self.ti.state_dict()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ti.load_state_dict({k: v for k, v in state.items() if k.startswith(STATE_PREFIX)})
        self.lora.load_state_dict({k: v for k, v in state.items() if not k.startswith(STATE_PREFIX)})

    def export(self, directory: Path, model: DiffusionModel, metadata: dict[str, str], dtype: torch.dtype) -> None:
        embedding = {"difftune_embedding": json.dumps(self.ti.settings())}
        self.lora.export(directory, model, {**metadata, **embedding}, dtype, bundle=self.ti.bundle_tensors(dtype))
        self.ti.export(directory, model, metadata, dtype)

    def describe(self) -> dict[str, Any]:
        lora, ti = self.lora.describe(), self.ti.describe()
        return {**lora, "type": f"{lora['type']} + textual_inversion",
                "pivotal": {k: ti[k] for k in ("token", "num_vectors", "init_word")},
                "trains": self.trained_roles(),
                "trainable_parameters": lora["trainable_parameters"] + ti["trainable_parameters"]}


def bundled_vectors(model: DiffusionModel, path: str | None, token: str, num_vectors: int):
    """(vectors of `token` to continue from, a note): those bundled in the LoRA file (network.init_from), else
    those of the embedding file difftune wrote next to it (a diffusers-layout or converted LoRA has no
    bundle); (None, note) starts them from init_word."""
    from difftune.network.textual_inversion import embedding_file_name

    if path is None:
        return None, None
    if formats.read_bundle(path):
        return read_embedding_file(model, path, num_vectors, name=token), None
    beside = Path(path).parent / embedding_file_name(token)
    if beside.is_file():
        return (read_embedding_file(model, beside, num_vectors),
                f"network.init_from: {path} bundles no vectors; '{token}' continues from {beside}")
    return None, (f"network.init_from: {path} bundles no vectors for '{token}' (and there is no {beside.name} next "
                  "to it): they start from network.init_word")
