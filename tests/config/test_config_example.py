"""config.example.yaml documents every option of the model with its default, and nothing else."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from qpher_proxy.config import Config, config_from_dict

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yaml"


def _options(cls: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf option of a config dataclass, by dotted name, with its default."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            out.update(_options(type(f.default_factory()), f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
    return out


def _leaves(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{name}."))
        else:
            out[prefix + name] = value
    return out


def test_the_example_lists_every_option_with_its_default() -> None:
    assert _leaves(yaml.safe_load(EXAMPLE.read_text())) == _options(Config)


def test_path_parameters_are_refused_unless_enabled() -> None:
    assert Config().upstream.allow_path_params is False
    cfg = config_from_dict({"upstream": {"allow_path_params": True}}, EXAMPLE.parent)
    assert cfg.upstream.allow_path_params is True
