"""The one small ``Registry`` class: a named mapping from string to class or factory."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator, TypeVar

from registry.plugins import load_entry_point_plugins

T = TypeVar("T")


class RegistryError(KeyError):
    """Raised for unknown or duplicate names; the message names registry, name and choices."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class Registry:
    """Maps names to classes or factory functions.

    ``home`` is the package whose import registers the built-in entries; it is imported the
    first time the registry is queried, never at registration time.
    """

    def __init__(self, name: str, home: str | None = None) -> None:
        self.name = name
        self.home = home
        self._entries: dict[str, Any] = {}
        self._home_loaded = home is None

    # -- registration -------------------------------------------------------------------
    def register(self, *names: str, override: bool = False) -> Callable[[T], T]:
        """Decorator registering the object under one or more names.

        Registering a taken name raises unless ``override=True`` is passed explicitly.
        """
        if not names:
            raise TypeError(f"{self.name}.register() needs at least one name")

        def decorator(obj: T) -> T:
            for name in names:
                self.add(name, obj, override=override)
            return obj

        return decorator

    def add(self, name: str, obj: Any, override: bool = False) -> None:
        """Register ``obj`` under ``name`` (non-decorator form)."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"registry '{self.name}': names must be non-empty strings, got {name!r}")
        existing = self._entries.get(name)
        if existing is not None and existing is not obj and not override:
            raise RegistryError(
                f"registry '{self.name}': name '{name}' is already registered to "
                f"{_describe(existing)}; pass override=True to replace it with {_describe(obj)}"
            )
        self._entries[name] = obj

    def unregister(self, name: str) -> Any:
        """Remove and return an entry (mainly for tests)."""
        return self._entries.pop(name)

    # -- lookup -----------------------------------------------------------------------------
    def _ensure_home(self) -> None:
        """Import the home package (built-in entries) and installed entry-point plugins, once."""
        if self._home_loaded:
            return
        # Set first: the home package may itself query this registry while it is being imported.
        self._home_loaded = True
        try:
            importlib.import_module(self.home)
        except Exception:
            self._home_loaded = False  # let a later lookup retry and show the same error
            raise
        # Installed third-party packages may add entries too (entry-point group blip2.plugins).
        load_entry_point_plugins()

    def get(self, name: str) -> Any:
        """Return the entry for ``name``; unknown names raise with close matches and all choices."""
        if name not in self._entries:
            self._ensure_home()
        try:
            return self._entries[name]
        except KeyError:
            pass
        import difflib  # only on the error path: keeps `import registry` at a few milliseconds

        available = sorted(self._entries)
        close = difflib.get_close_matches(str(name), available, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise RegistryError(
            f"registry '{self.name}' has no entry '{name}'.{hint} "
            f"Available: {', '.join(available) if available else '(none)'}"
        )

    def list(self) -> list[str]:
        """Sorted names of every entry (built-ins and plugins)."""
        self._ensure_home()
        return sorted(self._entries)

    def names_of(self, obj: Any) -> list[str]:
        """All names under which ``obj`` is registered."""
        self._ensure_home()
        return [n for n, o in self._entries.items() if o is obj]

    def __contains__(self, name: object) -> bool:
        if name not in self._entries:
            self._ensure_home()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self.list())

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {len(self._entries)} entries)"


def _describe(obj: Any) -> str:
    module = getattr(obj, "__module__", "?")
    qualname = getattr(obj, "__qualname__", repr(obj))
    return f"{module}.{qualname}"
