"""`train.lr_from = "runs/x/find-lr/find_lr.json"`: take the LR (or cyclic bounds) from a find-lr result.

A sweep of all groups together keeps their configured ratios, so the other explicit LRs
(text_encoder_lr, text_encoder_2_lr, embedding_lr) move with train.lr. A sweep of one role's LR
(`find_lr.group`, the result's `lr_key`) sets that key instead (`train.text_encoder_lr`, ...), leaving
train.lr as configured.

Resolved once when the config is validated, so everything downstream (doctor, schedule preview, the
resolved config in the run directory) sees the numbers actually trained with. For
`train.lr_scheduler = "cyclic"` the schedule cycles between the sweep's bounds (Smith's cyclical
learning rates take exactly these from a range test): `train.lr_min` = lr_min, `train.lr` = lr_max.
Any other schedule uses the recommended `lr` as its peak.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from difftune.config.schema import Config


def apply_lr_from(config: Config, source: str) -> None:
    """Set train.lr (and train.lr_min for cyclic) from the file in train.lr_from; ConfigError if unusable."""
    from difftune.errors import ConfigError

    path_text = config.train.lr_from
    if not path_text:
        return
    key = f"{source}: train.lr_from = {path_text!r}"
    path = Path(path_text).expanduser()
    if path.is_dir():  # a run or find-lr folder is accepted too
        candidates = [path / "find_lr.json", path / "find-lr" / "find_lr.json"]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    if not path.is_file():
        raise ConfigError(f"{key}: file not found (expected the find_lr.json that `difftune find-lr` writes)")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{key}: not a readable find-lr result: {e}") from None
    if not isinstance(result, dict) or "lr" not in result:
        raise ConfigError(f"{key}: not a find-lr result (no 'lr' key; expected the find_lr.json of `difftune find-lr`)")
    verdict = result.get("verdict")
    lr_key = str(result.get("lr_key", "train.lr")).removeprefix("train.")
    if lr_key not in ("lr", *OTHER_LRS):
        raise ConfigError(f"{key}: lr_key {lr_key!r} is not an LR difftune sweeps; was the file edited?")
    if lr_key != "lr":  # a sweep of one role's LR (find_lr.group) with the others held
        lr = _learning_rate(result, "lr", key)
        if lr is None:
            raise ConfigError(f"{key}: that sweep recommends no {lr_key} (verdict: {verdict})")
        setattr(config.train, lr_key, lr)
        return
    if config.train.lr_scheduler == "cyclic":
        low, high = (_learning_rate(result, k, key) for k in ("lr_min", "lr_max"))
        if not (low and high and low < high):
            raise ConfigError(
                f"{key}: train.lr_scheduler = 'cyclic' needs lr_min < lr_max from the sweep, the file has "
                f"lr_min = {low}, lr_max = {high} (verdict: {verdict})"
            )
        _keep_ratios(config, high)
        config.train.lr_min, config.train.lr = low, high
        return
    lr = _learning_rate(result, "lr", key)
    if lr is None:
        raise ConfigError(f"{key}: that sweep recommends no LR (verdict: {verdict})")
    _keep_ratios(config, lr)
    config.train.lr = lr


OTHER_LRS = ("text_encoder_lr", "text_encoder_2_lr", "embedding_lr")


def _keep_ratios(config: Config, lr: float) -> None:
    """The sweep ramped every group at its configured ratio to train.lr: the other explicit LRs move with it."""
    for other in OTHER_LRS:
        value = getattr(config.train, other)
        if value is not None:
            setattr(config.train, other, value * lr / config.train.lr)


def _learning_rate(result: dict, name: str, key: str) -> float | None:
    """result[name] as a positive finite float, None when absent or null; ConfigError for anything else."""
    from difftune.errors import ConfigError

    value = result.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key}: '{name}' is {value!r}, not a positive learning rate; was the file edited?")
    return float(value)
