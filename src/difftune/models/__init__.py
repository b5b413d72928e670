"""Model families: everything family-specific sits behind `DiffusionModel` (models/base.py), one folder
per family, registered in models/registry.py.

Imports are lazy so the config schema can read the registry without importing torch or diffusers.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("load_model", "weightless_model"):
        from difftune.models import loading

        return getattr(loading, name)
    if name == "DiffusionModel":
        from difftune.models.base import DiffusionModel

        return DiffusionModel
    raise AttributeError(name)


__all__ = ["DiffusionModel", "load_model", "weightless_model"]
