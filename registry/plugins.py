"""Third-party plugins: modules named in a YAML/CLI, and installed ``blip2.plugins`` entry points.

A plugin is an ordinary module whose import registers components with the usual decorators, e.g.
``@registry.models.register("my_model")``. It is loaded in one of three ways:

* ``plugins: [my_pkg.my_module]`` in a project YAML (read by ``runners.config.Config``);
* ``--plugins my_pkg.my_module`` on the command line of ``runners.train`` / ``runners.evaluate``;
* an installed distribution declaring the entry-point group ``blip2.plugins``
  (``entry_points={"blip2.plugins": ["my_plugin = my_pkg.my_module"]}``), loaded automatically the
  first time any registry is queried.
"""
from __future__ import annotations

import importlib
from typing import Iterable

ENTRY_POINT_GROUP = "blip2.plugins"
_loaded_entry_points = False


class PluginNotFoundError(ImportError):
    """A plugin module named in a YAML or on the command line is not importable at all."""


def load_plugins(modules: Iterable[str] | str | None) -> list[str]:
    """Import each named module so that its decorators register components; returns the names."""
    if isinstance(modules, str):
        modules = [modules]
    loaded = []
    for name in modules or []:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"plugin names must be non-empty module names (strings), got {name!r}")
        name = name.strip()
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and name != err.name and not name.startswith(err.name + "."):
                raise  # the plugin exists but one of its own imports is missing: show that error as is
            raise PluginNotFoundError(
                f"plugin module '{name}' could not be imported ({err}). Plugins are importable module "
                f"names (on PYTHONPATH or installed), listed under 'plugins:' or passed with --plugins."
            ) from err
        loaded.append(name)
    return loaded


def load_entry_point_plugins(force: bool = False) -> list[str]:
    """Load every installed entry point of the group ``blip2.plugins`` (once per process unless forced)."""
    global _loaded_entry_points
    if _loaded_entry_points and not force:
        return []
    import logging  # both imported here, not at `import registry` (they cost more than the registry itself)
    from importlib import metadata

    logger = logging.getLogger(__name__)
    _loaded_entry_points = True
    names = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:
            dist = getattr(getattr(ep, "dist", None), "name", "?")
            raise ImportError(
                f"plugin entry point '{ep.name} = {ep.value}' (group {ENTRY_POINT_GROUP}, distribution {dist}) "
                f"failed to load: {err}"
            ) from err
        names.append(ep.name)
        logger.info("loaded plugin entry point %s = %s", ep.name, ep.value)
    return names
