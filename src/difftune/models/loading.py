"""Resolve `model.path` to a loaded adapter through the family registry.

Everything loads from local files; nothing is fetched from a hub.
"""

from __future__ import annotations

from difftune.errors import ModelLoadError  # noqa: F401  (re-exported for callers)
from difftune.models.registry import family_for


def load_model(config):
    """Load the model named by `config.path` (a ModelConfig) on the CPU; the trainer moves it to its device."""
    return family_for(config).api("load")(config)


def weightless_model(config):
    """The model's architecture with no weights (meta tensors), or None when only its weights tell it."""
    return family_for(config).api("weightless")(config)
