"""Third-party plugins: modules named in a YAML/CLI, and installed ``blip2.plugins`` entry points."""
from __future__ import annotations

import importlib
import logging
from importlib import metadata
from typing import Iterable

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "blip2.plugins"
_loaded_entry_points = False


def load_plugins(modules: Iterable[str] | None) -> list[str]:
    """Import each named module so that its decorators register components; returns the names."""
    loaded = []
    for name in modules or []:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ImportError(
                f"plugin module '{name}' could not be imported ({err}). Plugins are importable module "
                f"names (on PYTHONPATH or installed), listed under 'plugins:' or passed with --plugins."
            ) from err
        loaded.append(name)
    return loaded


def load_entry_point_plugins(force: bool = False) -> list[str]:
    """Load every installed entry point of the group ``blip2.plugins`` (once per process)."""
    global _loaded_entry_points
    if _loaded_entry_points and not force:
        return []
    _loaded_entry_points = True
    names = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
        names.append(ep.name)
        logger.info("loaded plugin entry point %s = %s", ep.name, ep.value)
    return names
