"""Typed configuration: schema, loading, overrides and resolved-config writing."""

from difftune.config.loading import ConfigError, load_config, write_resolved_config
from difftune.config.schema import Config

__all__ = ["Config", "ConfigError", "load_config", "write_resolved_config"]
