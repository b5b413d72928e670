"""What doctor learns from the model's architecture (the network's size, the GPU memory budget),
remembered between runs.

Both are counted on a weightless (meta-device) copy of the model, which is cheap to build but needs
diffusers, transformers and LyCORIS imported: seconds before doctor could print anything. So the
facts are kept in a small JSON file per (difftune version, configuration, model identity) under
$DIFFTUNE_CACHE_DIR (default $XDG_CACHE_HOME/difftune or ~/.cache/difftune). `train` writes them as
well (it has those libraries loaded already), so doctor on a config that trained, or that doctor
checked before, answers from the file. The model's identity is its files' configs, names, sizes and
modification times, so an edited or replaced model is counted again; any config change is too.
Nothing here is needed: an unwritable cache only means counting again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from difftune import __version__
from difftune.config.schema import Config

IGNORED_SECTIONS = ("output", "sample", "validation", "find_lr", "find_steps", "auto")
"""Config sections that change neither the network nor the memory budget."""


def cache_dir() -> Path:
    if os.environ.get("DIFFTUNE_CACHE_DIR"):
        return Path(os.environ["DIFFTUNE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "difftune"


def model_identity(path: str) -> list:
    """A built-in name as it is; a folder by its JSON configs' content and its other files' names, sizes
    and modification times; a single file by its size and modification time."""
    target = Path(path).expanduser()
    if not target.exists():
        return [path]
    if target.is_file():
        stat = target.stat()
        return [str(target.resolve()), stat.st_size, stat.st_mtime_ns]
    parts = []
    for file in sorted(p for p in target.rglob("*") if p.is_file()):
        relative = str(file.relative_to(target))
        if file.suffix == ".json" and file.stat().st_size < 1 << 20:
            parts.append([relative, hashlib.sha256(file.read_bytes()).hexdigest()])
        else:
            stat = file.stat()
            parts.append([relative, stat.st_size, stat.st_mtime_ns])
    return [str(target.resolve()), parts]


def facts_key(config: Config) -> str:
    from difftune.config.loading import config_to_dict

    relevant = {k: v for k, v in config_to_dict(config).items() if k not in IGNORED_SECTIONS}
    text = json.dumps([__version__, relevant, model_identity(config.model.path)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def compute_facts(config: Config) -> dict[str, Any]:
    """{"network": network_facts or None, "memory_budget": budget or None, "prediction_type": what the
    denoiser predicts} on one weightless copy."""
    from difftune.models import weightless_model
    from difftune.training.memory_budget import memory_budget

    architecture = weightless_model(config.model)
    network = None
    if config.network.type not in (None, "none"):
        from difftune.network.facts import network_facts

        network = network_facts(config, architecture) if architecture is not None else None
    budget = None
    if architecture is not None:
        budget = memory_budget(config, architecture, network["trainable_parameters"] if network else None)
    prediction = getattr(architecture, "prediction_type", None) if architecture is not None else None
    return {"network": network, "memory_budget": budget, "prediction_type": prediction}


def facts_file(config: Config) -> Path:
    return cache_dir() / "model_facts" / f"{facts_key(config)}.json"


def model_facts(config: Config) -> dict[str, Any]:
    """The facts from the cache, or counted (and then kept)."""
    path = facts_file(config)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    facts = compute_facts(config)
    remember(path, facts)
    return facts


def record_facts(config: Config) -> None:
    """Count and keep the facts unless they are kept already (`train` and `demo` call this)."""
    path = facts_file(config)
    if not path.is_file():
        remember(path, compute_facts(config))


def remember(path: Path, facts: dict[str, Any]) -> None:
    from difftune.checkpoint.atomic import atomic_write_json

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, facts)
    except OSError:
        pass  # a read-only home: doctor counts again next time
