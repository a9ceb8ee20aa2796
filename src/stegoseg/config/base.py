"""Typed configs: the shared base, YAML files and validation helpers.
"""
from __future__ import annotations

import typing
from dataclasses import asdict
from pathlib import Path

import yaml

from stegoseg.errors import StegosegError


class ConfigBase:
    """What every config dataclass shares (Config, PretrainConfig): a dict, the YAML
    ``config.yaml`` a run writes, and validation that stops at the first failed check."""

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def validate(self) -> None:  # overridden with the class's checks
        pass


def raise_first_failure(checks) -> None:
    """``checks``: (condition, one-line message) pairs; raise the message of the first false one."""
    for ok, message in checks:
        if not ok:
            raise StegosegError(message)


def base_type(tp):
    """Unwrap Optional[X] -> X."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


class _ExplicitNone:
    """What ``--option none`` parses to, so that an explicit None is told apart from an
    option that was not given (argparse's default, None); see :func:`stegoseg.config.stego.explicit_values`."""

    def __repr__(self) -> str:
        return "None"


EXPLICIT_NONE = _ExplicitNone()


def parse_optional(kind):
    def parse(text: str):
        if text.lower() in ("none", "null", ""):
            return EXPLICIT_NONE
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


def load_yaml(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise StegosegError(f"--config {p}: file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise StegosegError(f"--config {p}: not valid YAML ({exc.__class__.__name__})") from exc
    if not isinstance(data, dict):
        raise StegosegError(f"--config {p}: expected a mapping of option: value")
    return data


