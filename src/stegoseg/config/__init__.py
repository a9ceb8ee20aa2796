"""Typed configuration: :class:`Config` (every option of every command, grouped by stage in
:data:`FIELD_GROUPS`), the named presets (``presets/*.yaml``), YAML files and command-line
options, in that order of precedence."""
from stegoseg.config.base import ConfigBase, load_yaml, raise_first_failure
from stegoseg.config.stego import (
    FIELD_GROUPS,
    PRESETS,
    Config,
    add_config_arguments,
    make_config,
    replace,
    resolve_config,
    selection_mode,
)

__all__ = ["Config", "ConfigBase", "FIELD_GROUPS", "PRESETS", "add_config_arguments", "load_yaml", "make_config",
           "raise_first_failure", "replace", "resolve_config", "selection_mode"]
