"""Config layers as read: YAML files and ``--options`` into OmegaConf nodes, raw node access, the error type.

Importing this module registers the ``${cache_root:...}`` resolver, so every YAML read afterwards can use it.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import omegaconf
from omegaconf import DictConfig, ListConfig, OmegaConf

from common.paths import cache_root

_omegaconf_version = tuple(int(p) for p in omegaconf.__version__.split(".")[:2])


def _cache_root_resolver(*parts: Any) -> str:
    return str(cache_root().joinpath(*map(str, parts)))


# ``${cache_root:coco/images}`` in any YAML resolves to <cache root>/coco/images at access time.
# (OmegaConf >= 2.4 names the new-style API register_resolver; 2.3 calls it register_new_resolver.)
_register = OmegaConf.register_resolver if _omegaconf_version >= (2, 4) else OmegaConf.register_new_resolver
_register("cache_root", _cache_root_resolver, replace=True)


class ConfigError(ValueError):
    """A config file or option is wrong; the message names the key, the file and what is valid."""


def unknown_key_message(path: str, key: str, valid: Iterable[str], source: str) -> str:
    valid = sorted(set(valid))
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown key '{path}' (from {source}).{hint} Valid keys: {', '.join(valid)}"



@dataclass
class Layer:
    source: str  # a file path or "--options"
    cfg: DictConfig


def load_yaml(path: str | os.PathLike, what: str) -> DictConfig:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{what} '{path}' does not exist")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and OmegaConf grammar errors
        raise ConfigError(f"{what} '{path}' is not valid YAML: {err}") from err
    if cfg is None:
        cfg = OmegaConf.create()
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{what} '{path}' must hold a mapping at the top level, got a list")
    return cfg


def parse_options(options: Sequence[str] | None) -> DictConfig:
    options = list(options or [])
    bad = [o for o in options if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"--options takes key=value pairs (e.g. run.batch_size_train=8); got {bad}")
    try:
        return OmegaConf.from_dotlist(options)
    except Exception as err:
        raise ConfigError(f"cannot parse --options {options}: {err}") from err


def get_node(cfg: DictConfig | None, *keys: str) -> Any:
    """cfg[k1][k2]... or None when any level is missing (no interpolation is resolved)."""
    for key in keys:
        if not isinstance(cfg, DictConfig) or key not in cfg:
            return None
        cfg = cfg._get_node(key)  # raw node: keeps "${...}" unresolved
        cfg = cfg if isinstance(cfg, (DictConfig, ListConfig)) else cfg._value()
    return cfg


def node_keys(node: Any) -> list[str]:
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def plugin_names(node: Any, source: str) -> list[str]:
    if node is None:
        return []
    if isinstance(node, str):
        return [node]
    if isinstance(node, ListConfig) and all(isinstance(v, str) for v in node):
        return list(node)
    raise ConfigError(f"'plugins' (from {source}) must be a list of module names, got {node!r}")


def has_key(cfg: DictConfig, keys: Sequence[str]) -> bool:
    """True when the (possibly null-valued) key path exists in cfg."""
    node: Any = cfg
    for key in keys:
        if not isinstance(node, DictConfig) or key not in node:
            return False
        node = node._get_node(key)
        node = node if isinstance(node, (DictConfig, ListConfig)) else None
    return True
