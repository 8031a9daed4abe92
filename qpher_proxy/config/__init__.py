"""Configuration: the model (frozen dataclasses) and its strict loader."""

from .loader import config_from_dict, load_config, parse_listen
from .model import Config

__all__ = ["Config", "config_from_dict", "load_config", "parse_listen"]
