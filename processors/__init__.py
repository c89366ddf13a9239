"""Image and text processors, registered in ``registry.processors``.

    import processors
    vis = processors.build_processor({"name": "blip_image_eval", "image_size": 224})
    pixels = vis("photo.jpg")            # float32 [3, 224, 224]
"""
from __future__ import annotations

from typing import Any, Mapping

from omegaconf import DictConfig

import registry
from processors.base import BaseProcessor, ProcessorConfigError, check_processor_keys
from processors.image import (
    CLIP_MEAN,
    CLIP_STD,
    Blip2ImageTrainProcessor,
    BlipImageBaseProcessor,
    BlipImageEvalProcessor,
    BlipImageTrainProcessor,
    ImageLoadError,
    as_rgb_image,
    load_image,
    to_rgb,
)
from processors.text import BlipCaptionProcessor, BlipQuestionProcessor, clean_caption, clean_question


def build_processor(cfg: DictConfig | Mapping[str, Any] | None) -> BaseProcessor:
    """Build the processor named by ``cfg.name`` from ``cfg``; ``None`` or no name gives the identity."""
    if cfg is None or not cfg.get("name"):
        if cfg:
            extra = sorted(k for k in cfg if k != "name")
            raise ProcessorConfigError(f"processor config has options {extra} but no 'name' to apply them to")
        return BaseProcessor()
    return registry.processors.get(cfg["name"]).from_config(cfg)


__all__ = [
    "BaseProcessor",
    "BlipImageBaseProcessor",
    "BlipImageEvalProcessor",
    "Blip2ImageTrainProcessor",
    "BlipImageTrainProcessor",
    "BlipCaptionProcessor",
    "BlipQuestionProcessor",
    "ImageLoadError",
    "ProcessorConfigError",
    "CLIP_MEAN",
    "CLIP_STD",
    "build_processor",
    "check_processor_keys",
    "clean_caption",
    "clean_question",
    "load_image",
    "to_rgb",
    "as_rgb_image",
]
