"""The interface between the trainer and what it trains.

A network decides which parameters train (one LR group per role: "denoiser", "text_encoder",
"text_encoder_2", and "embedding" for textual-inversion vectors), how the trainable weights are saved
for resume, and how they are exported for users (a diffusers folder or single file for a full
fine-tune, a LoRA file for the LoRA family, an embedding file for textual inversion). The loop only
calls these methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from difftune.config.network_rules import TEXTUAL_INVERSION
from difftune.config.schema import Config
from difftune.models.base import DiffusionModel


class TrainableNetwork(Protocol):
    def param_groups(self, lrs: dict[str, float]) -> list[dict[str, Any]]:
        """Optimizer parameter groups, each with `params`, `lr` (lrs[role]) and `name` (the role)."""
        ...

    def trained_roles(self) -> list[str]:
        """Roles of the model this network trains (or attaches to)."""
        ...

    def trained_modules(self) -> list[torch.nn.Module]:
        """Modules that hold trainable parameters (put in train mode, checkpointed, prepared)."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor, for bit-exact resume."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def export(self, directory: Path, model: DiffusionModel, metadata: dict[str, str], dtype: torch.dtype) -> None:
        """Write the user-facing result into `directory` (which exists and is empty)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Facts for doctor: type, trainable parameter count, export size estimate."""
        ...


def roles_to_train(model: DiffusionModel, config: Config) -> list[str]:
    """The denoiser (train.train_unet) and the text encoders train.train_text_encoder selects."""
    from difftune.optim.scaling import roles_to_train as select

    return select(config.train, model.text_encoder_roles, getattr(model, "frozen_text_encoder_roles", ()))


def build_network(model: DiffusionModel, config: Config) -> TrainableNetwork:
    """Full fine-tune when `network.type` is absent; textual inversion; the LoRA family, with
    textual-inversion vectors beside it when network.pivotal."""
    if config.network.type in (None, "none"):
        from difftune.network.full import FullFineTune

        return FullFineTune(model, roles_to_train(model, config), export_format=config.output.checkpoint_format)
    if config.network.type == TEXTUAL_INVERSION:
        from difftune.network.textual_inversion import TextualInversion

        return TextualInversion.for_training(model, config)
    if config.network.pivotal:
        from difftune.network.pivotal import PivotalNetwork

        return PivotalNetwork.for_training(model, config)
    from difftune.network.lycoris_net import LoraFamilyNetwork

    return LoraFamilyNetwork.for_training(model, config)
