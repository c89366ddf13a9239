"""Checkpoint formats and the one loading function that reads any of them in our parameter names.

Our names are LAVIS's (``query_tokens``, ``ln_vision``, ``Qformer.bert.*``, ``vision_proj``, ``opt_proj``, ...;
EVA ViT keys are timm's, which equal LAVIS's ``eva_vit_g.pth``). The formats, one small module each:

* ``sources``: where the tensors come from (file, directory, URL, hub id) and reading them (safetensors,
  ``torch.load(weights_only=True)``), whole or a selection of names.
* ``vision_keys``: image-encoder layouts (Hugging Face ``vision_model.*``, OpenAI CLIP) <-> timm names.
* ``blip2_keys``: Hugging Face BLIP-2 <-> ours, and the stage-1 parts a stage-2 model leaves out.
* ``models/instructblip_layout.py``: Hugging Face InstructBLIP (image and video), which differs from HF BLIP-2
  only in its Q-Former embeddings.
* LAVIS ``.pth`` files (``{"model": state_dict}``, trainable parts only) and ours already use our names; a trained
  CLIP ViT-L inside one is renamed to timm's here.

``load_state_dict_any`` / ``iter_state_dict_any`` detect the format from the names and return ours. Nothing here
imports an image encoder or LLM class; writing a Hugging Face checkpoint is ``models/hf_export.py``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Iterable, Iterator, Mapping

from torch import Tensor, nn

from models.checkpoints.blip2_keys import (  # noqa: F401 (re-exported: the key maps are part of this API)
    PROJECTION_NAMES,
    hf_to_ours,
    model_layout,
    ours_to_hf,
    stage1_only,
)
from models.checkpoints.sources import (  # noqa: F401 (re-exported)
    StateDict,
    file_keys,
    load_file,
    read_state_dict,
    resolve_source,
    weight_files,
)
from models.checkpoints.vision_keys import (  # noqa: F401 (re-exported)
    hf_vision_to_timm,
    is_vision_key,
    openai_clip_to_timm,
    timm_vision_to_hf,
    vision_state_dict_to_timm,
    visual_encoder_part,
)

from models.instructblip_layout import instructblip_to_blip2, is_instructblip_layout

logger = logging.getLogger(__name__)


def detect_format(state_dict: Mapping[str, Tensor] | Iterable[str]) -> str:
    """``"hf"`` (Hugging Face BLIP-2), ``"ours"`` (ours = LAVIS names) or ``"vision"`` (an image encoder alone), from
    a state dict or its names."""
    keys = list(state_dict)
    if any(k.startswith(("qformer.", "vision_model.", "language_projection.")) for k in keys):
        return "hf"
    if any(k.startswith(("Qformer.", "query_tokens", "ln_vision.", "visual_encoder.")) for k in keys):
        return "ours"
    return "vision"


def _hf_text_model_type(source: str | os.PathLike) -> str | None:
    try:
        path = resolve_source(source)
    except FileNotFoundError:
        return None
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.exists():
        return None
    return json.loads(config.read_text()).get("text_config", {}).get("model_type")


_LAVIS_CLIP_PREFIXES = ("visual_encoder.conv1.", "visual_encoder.transformer.resblocks.", "visual_encoder.class_embedding")


class _ToOurNames:
    """Renames raw checkpoint tensors to ours, a piece at a time: the format is decided once, from all names."""

    def __init__(self, names: list[str], source: str | os.PathLike | Mapping[str, Tensor], model: nn.Module | None):
        self.format = detect_format(names)
        self.layout = None
        self.instructblip = self.format == "hf" and is_instructblip_layout(names)
        if self.format == "hf":
            text_type = None if isinstance(source, Mapping) else _hf_text_model_type(source)
            self.layout = model_layout(model, text_type)
        # a LAVIS model with a trained CLIP ViT-L: its visual_encoder.* keys are OpenAI CLIP names
        self.lavis_clip = self.format != "hf" and any(k.startswith(_LAVIS_CLIP_PREFIXES) for k in names)
        self.own = set(model.state_dict()) if model is not None else None
        self.dropped: list[str] = []

    def __call__(self, raw: StateDict) -> StateDict:
        if self.layout is not None:
            raw = hf_to_ours(instructblip_to_blip2(raw) if self.instructblip else raw, self.layout)
        elif self.lavis_clip:
            vision = openai_clip_to_timm({k.removeprefix("visual_encoder."): v for k, v in raw.items()
                                          if k.startswith("visual_encoder.")})
            raw = {k: v for k, v in raw.items() if not k.startswith("visual_encoder.")}
            raw.update({f"visual_encoder.{k}": v for k, v in vision.items()})
        if self.own is not None:  # a stage-1 checkpoint (or HF weights) for a stage-2 model: drop what it never uses
            unused = {k for k in raw if k not in self.own and stage1_only(k)}
            self.dropped += sorted(unused)
            raw = {k: v for k, v in raw.items() if k not in unused}
        return raw

    def report(self) -> None:
        if self.dropped:
            logger.info("ignoring %d checkpoint tensors the model has no place for (e.g. %s)", len(self.dropped),
                        self.dropped[0])


def load_state_dict_any(source: str | os.PathLike | Mapping[str, Tensor], model: nn.Module | None = None) -> StateDict:
    """Read any supported checkpoint (LAVIS .pth, Hugging Face BLIP-2 dir/file/hub id, ours) as *our* names.

    With ``model``, HF LLM and projection names go where that model keeps them (its ``FrozenLLM`` adapter's
    ``.model``); without it, at ``opt_model.model.``/``opt_proj`` or ``t5_model.model.``/``t5_proj`` chosen by the
    HF config's text model type. LAVIS and our checkpoints already use our names and are returned as they are.
    """
    raw = dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    to_ours = _ToOurNames(list(raw), source, model)
    state = to_ours(raw)
    to_ours.report()
    return state


def iter_state_dict_any(
    source: str | os.PathLike | Mapping[str, Tensor], model: nn.Module | None = None, piece_size: int = 64
) -> Iterator[StateDict]:
    """``load_state_dict_any`` in pieces of at most ``piece_size`` tensors (each from one file), so that loading a
    checkpoint into a built model holds one copy of the weights plus a piece in memory, not two copies."""
    if isinstance(source, Mapping):
        yield load_state_dict_any(source, model)
        return
    files = weight_files(resolve_source(source))
    names = {file: file_keys(file) for file in files}
    to_ours = _ToOurNames([k for file in files for k in names[file]], source, model)
    for file in files:
        for start in range(0, len(names[file]), piece_size):
            piece = set(names[file][start : start + piece_size])
            # the file is opened (memory-mapped) per piece on purpose: closing it unmaps the pages read so far, so
            # they do not add up in the process's memory while the model fills
            yield to_ours(load_file(file, piece.__contains__))
    to_ours.report()
