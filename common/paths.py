"""Where downloaded data, built assets and weights live (the cache root and storage paths under it), and whether
the network may be used for them.

The rule: ``$BLIP2_CACHE_ROOT`` if set, else ``~/.cache/blip2``; ``~`` is expanded. Dataset YAMLs spell the
same rule as ``${oc.env:BLIP2_CACHE_ROOT,'~/.cache/blip2'}`` so that it shows in a printed config.
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ROOT_ENV = "BLIP2_CACHE_ROOT"
DEFAULT_CACHE_ROOT = "~/.cache/blip2"


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` forbids the network (``1``/``true``/``yes``/``on``, as ``huggingface_hub`` reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def cache_root() -> Path:
    """Root of downloaded data and weights: ``$BLIP2_CACHE_ROOT``, else ``~/.cache/blip2`` (``~`` expanded)."""
    return Path(os.path.expanduser(os.environ.get(CACHE_ROOT_ENV) or DEFAULT_CACHE_ROOT))


def resolve_storage_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """``~`` is expanded; a relative path is taken relative to ``root`` (default: ``cache_root()``)."""
    expanded = Path(os.path.expanduser(os.fspath(path)))
    if expanded.is_absolute():
        return expanded
    base = Path(os.path.expanduser(os.fspath(root))) if root is not None else cache_root()
    return base / expanded
