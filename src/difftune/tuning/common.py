"""What the tuners share: derived configs for their sub-runs, and small helpers.

Every tuner trains the user's real setup (same model, network, optimizer, batch, precision, data),
built by the same `Trainer` a training run uses, but writes under its own sub-folder of `output.dir`
(`find-lr/`, `find-steps/`, `final/`), so a run the user already has there is never touched. A disk
latent cache is the parent's (`<output.dir>/latent_cache`, unless data.latent_cache_dir names one), so it
is built once for all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difftune.config.schema import Config


def sub_config(config: Config, folder: str | None, **sections: dict[str, Any]) -> Config:
    """A copy of `config` writing to `<output.dir>/<folder>` (None: output.dir itself, as it is), with some
    keys changed per section.

    The copy is re-validated, so a change that makes the config invalid fails here with the key.
    """
    from difftune.config.loading import config_to_dict, validate_config
    from difftune.data.cache_paths import latent_cache_folder

    data = config_to_dict(config)
    if folder is not None:
        data["output"]["dir"] = str(Path(config.output.dir) / folder)
        data["output"]["overwrite"] = True  # a tuner's own folder is redone on every call
    if config.data.cache_latents == "disk" and not config.data.latent_cache_dir:
        # every sub-run reads the parent's disk cache: entries are keyed by content, so they are the same
        data["data"]["latent_cache_dir"] = str(latent_cache_folder(config.data, config.output.dir))
    for section, values in sections.items():
        target = data.setdefault(section, {})
        for key, value in values.items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
    return validate_config(data, f"{folder} config derived from {config.output.dir}")


def constant_lr_changes(config: Config, lr: float) -> dict[str, Any]:
    """`train` keys that train at a constant `lr` (the text encoder keeps its ratio to the UNet's LR).

    Warmup is kept: it is part of the user's setup, and the step finder's curve must describe the final
    run exactly (same schedule, same steps).
    """
    train = config.train
    changes: dict[str, Any] = {"lr": lr, "lr_scheduler": "constant", "lr_from": None}
    for key in ("text_encoder_lr", "text_encoder_2_lr", "embedding_lr"):
        if getattr(train, key) is not None:
            changes[key] = getattr(train, key) * lr / train.lr
    return changes


def format_lr(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def refuse_lr_free(config: Config, command: str) -> None:
    """An optimizer that ignores train.lr (adaptive Adafactor) would make a sweep over lr meaningless:
    the loss falls at every point because the optimizer sets its own step size."""
    from difftune.errors import ConfigError
    from difftune.optim.optimizers import lr_ignored

    if lr_ignored(config):
        raise ConfigError(
            f"{command}: optimizer.name = '{config.optimizer.name}' with relative_step = true computes its own LR "
            "and ignores train.lr, so there is no LR to find. Set optimizer.relative_step = false and "
            "optimizer.scale_parameter = false (and optimizer.warmup_init = false) to sweep it like any optimizer"
        )
