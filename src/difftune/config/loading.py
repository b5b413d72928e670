"""Read a config file (TOML, YAML or JSON), apply `--set` overrides, validate, and write it back.

Errors are collected and reported together, each naming the file, the dotted key, the bad value and
what would be valid, so a user fixes everything in one go.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
import yaml
from pydantic import BaseModel, ValidationError

from difftune.config.schema import Config
from difftune.errors import ConfigError  # noqa: F401  (re-exported for callers)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML/YAML/JSON file into a nested dict, with a clear error on syntax problems."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: editors on Windows may add a BOM
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e}); save the file as UTF-8") from e
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r}; use .toml, .yaml, .yml or .json")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot parse: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of sections, got {type(data).__name__}")
    return data


def parse_override_value(text: str) -> Any:
    """Interpret the right side of `key=value` as a TOML value (1e-4, true, [1, 2], "x"), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides in place; returns data for chaining."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.lr=1e-4")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if len(parts) < 2:
            raise ConfigError(f"--set {item!r}: the key needs a section, e.g. train.{key.strip()}")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = parse_override_value(value.strip())
    return data


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at a location of the schema (for 'did you mean')."""
    import typing

    for part in loc[:-1]:
        if str(part).isdigit():  # an entry of a list of tables ([[data.subsets]]): the list's item model
            continue
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if typing.get_origin(annotation) is list:
            annotation = typing.get_args(annotation)[0]
        if not isinstance(annotation, type) or not issubclass(annotation, BaseModel):
            return []
        model = annotation
    return list(model.model_fields)


def format_validation_error(err: ValidationError, source: str) -> str:
    """Turn pydantic's error list into lines a user can act on."""
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            known = _known_keys(Config, loc)
            guess = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f"; did you mean {'.'.join(loc[:-1] + (guess[0],))!r}?" if guess else ""
            valid = f"; valid keys here: {', '.join(known)}" if known else ""
            lines.append(f"{source}: {key}: unknown key{hint}{valid}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if "input" in e and e["type"] != "missing" and loc:
            lines.append(f"{source}: {key} = {e['input']!r}: {msg}")
        else:
            lines.append(f"{source}: {key}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def validate_config(data: dict[str, Any], source: str = "config", libraries: bool = True) -> Config:
    """Build the typed Config, or raise ConfigError listing every problem.

    `libraries` = False leaves out the checks that import the optimizer's library (its settings, and a
    dry construction): `difftune schedule` stays fast; doctor and train check them."""
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
    from difftune.tuning.lr_from import apply_lr_from

    apply_lr_from(config, source)  # train.lr_from: LR / cyclic bounds from a find-lr result
    _check_registries(config, source, libraries)
    return config


def _check_registries(config: Config, source: str, libraries: bool = True) -> None:
    """Names that refer to registries (optimizers, schedules) are checked before any model loads."""
    from difftune.optim.registry import check_optimizer_config, check_scheduler_config

    problems = check_optimizer_config(config, libraries) + check_scheduler_config(config)
    if libraries and config.output.wandb:
        from difftune.reporting.wandb_sink import INSTALL_HINT, wandb_available

        if not wandb_available():
            problems.append(f"output.wandb = true needs the wandb package, which is not installed: {INSTALL_HINT}")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(f"{source}: {p}" for p in problems))


def load_config(path: str | Path | None, overrides: list[str] | None = None, libraries: bool = True) -> Config:
    """Read, override and validate a config; `path=None` starts from the defaults."""
    data = read_config_file(path) if path is not None else {}
    apply_overrides(data, overrides or [])
    source = str(path) if path is not None else "defaults"
    if overrides:
        source += " (with --set overrides)"
    return validate_config(data, source, libraries)


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain nested dict without None values (TOML has no null; None means 'default')."""

    def drop_none(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: drop_none(v) for k, v in obj.items() if v is not None}
        if isinstance(obj, (list, tuple)):
            return [drop_none(v) for v in obj]
        return obj

    return drop_none(config.model_dump(mode="json"))


def write_resolved_config(config: Config, path: str | Path) -> None:
    """Write the fully resolved config; reading it back gives an equal Config."""
    from difftune.checkpoint.atomic import atomic_write_text

    atomic_write_text(Path(path), tomli_w.dumps(config_to_dict(config)))  # a resume reads it: never half-written
