"""Model adapters: everything model-family specific sits behind `DiffusionModel`."""

from difftune.models.base import DiffusionModel
from difftune.models.loading import load_model

__all__ = ["DiffusionModel", "load_model"]
