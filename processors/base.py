"""The processor base class: a callable built from a (validated) config node.

A processor turns one raw item (an image, a caption, a question) into what a model consumes.
Every concrete processor declares the config keys it accepts in ``CONFIG_KEYS`` so that a typo in a
YAML fails loudly (with close matches) instead of being silently ignored.
"""
from __future__ import annotations

import difflib
from typing import Any, ClassVar, Mapping

from omegaconf import DictConfig, OmegaConf

import registry


class ProcessorConfigError(ValueError):
    """A processor config node holds a key the processor does not understand."""


def _as_plain_dict(cfg: DictConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def check_processor_keys(cls: type, keys: list[str] | set[str], where: str = "") -> list[str]:
    """Return one message per key of ``keys`` that ``cls`` does not accept (empty when all are fine)."""
    valid = set(getattr(cls, "CONFIG_KEYS", ())) | {"name"}
    messages = []
    for key in sorted(keys):
        if key in valid:
            continue
        close = difflib.get_close_matches(key, sorted(valid), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        place = f" in {where}" if where else ""
        messages.append(
            f"unknown key '{key}' for processor {cls.__name__}{place}.{hint} "
            f"Valid keys: {', '.join(sorted(valid))}"
        )
    return messages


@registry.processors.register("base", "identity")
class BaseProcessor:
    """Identity processor: returns its input unchanged (used when a config names no processor)."""

    CONFIG_KEYS: ClassVar[tuple[str, ...]] = ()

    def __call__(self, item: Any) -> Any:
        return item

    @classmethod
    def from_config(cls, cfg: DictConfig | Mapping[str, Any] | None = None) -> "BaseProcessor":
        """Build from a config node (``None`` means all defaults); unknown keys raise."""
        options = _as_plain_dict(cfg)
        errors = check_processor_keys(cls, set(options))
        if errors:
            raise ProcessorConfigError("\n".join(errors))
        options.pop("name", None)
        return cls(**options)

    @classmethod
    def build(cls, **options: Any) -> "BaseProcessor":
        """Keyword form of ``from_config``: ``BlipCaptionProcessor.build(prompt="a photo of ")``."""
        return cls.from_config(options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
