"""Hugging Face InstructBLIP key names (``InstructBlipForConditionalGeneration`` and the video variant).

They are Hugging Face BLIP-2's except the Q-Former's embeddings, which InstructBLIP keeps inside the Q-Former:
``qformer.embeddings.{word_embeddings,position_embeddings,layernorm}`` where BLIP-2 has ``embeddings.*_embeddings``
and ``qformer.layernorm``. Loading renames them to BLIP-2's and then uses the one BLIP-2 mapping
(``models.checkpoints.hf_to_ours``); export does the inverse after ``ours_to_hf``.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

from torch import Tensor

INSTRUCTBLIP_MODEL_TYPES = ("instructblip", "instructblipvideo")

_TO_BLIP2 = [
    (re.compile(r"^qformer\.embeddings\.layernorm\."), "qformer.layernorm."),
    (re.compile(r"^qformer\.embeddings\.(word_embeddings|position_embeddings|position_ids)"), r"embeddings.\1"),
]
_FROM_BLIP2 = [
    (re.compile(r"^qformer\.layernorm\."), "qformer.embeddings.layernorm."),
    (re.compile(r"^embeddings\.(word_embeddings|position_embeddings|position_ids)"), r"qformer.embeddings.\1"),
]


def is_instructblip_layout(names: Iterable[str]) -> bool:
    """True for the names of a Hugging Face InstructBLIP state dict (its Q-Former embeddings live in the Q-Former)."""
    return any(name.startswith("qformer.embeddings.") for name in names)


def _rename(state: Mapping[str, Tensor], rules) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key, count = pattern.subn(repl, key)
            if count:
                break
        out[key] = value
    return out


def instructblip_to_blip2(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face InstructBLIP names -> Hugging Face BLIP-2 names."""
    return _rename(state, _TO_BLIP2)


def blip2_to_instructblip(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face BLIP-2 names -> Hugging Face InstructBLIP names."""
    return _rename(state, _FROM_BLIP2)
