"""Whole BLIP-2 checkpoints: Hugging Face ``Blip2ForConditionalGeneration`` / ``Blip2ForImageTextRetrieval`` names
(``vision_model.*``, ``qformer.*``, ``language_projection``, ``language_model.*``) <-> ours (LAVIS's:
``visual_encoder``, ``ln_vision``, ``Qformer.bert.*``, ``query_tokens``, ``<llm>_proj``, ``<llm>_model.model.*``),
and which parts of a stage-1 checkpoint a stage-2 model leaves out.
"""
from __future__ import annotations

import logging
import re
from typing import Mapping

from torch import Tensor, nn

from models.checkpoints.sources import StateDict
from models.checkpoints.vision_keys import apply_rules, hf_vision_to_timm, timm_vision_to_hf

logger = logging.getLogger(__name__)

PROJECTION_NAMES = ("opt_proj", "t5_proj", "llm_proj")  # our name of HF's language_projection, by model
DEFAULT_LLM_PREFIXES = {"opt": "opt_model.model.", "t5": "t5_model.model."}  # used when no model is given

# (HF regex, our replacement) for everything but the vision tower, the LLM and its projection.
_HF_TO_OURS_RULES = [
    (r"^qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
    (r"^qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.", r"Qformer.bert.encoder.layer.\1.\2.self."),
    (r"^qformer\.encoder\.", "Qformer.bert.encoder."),
    (r"^embeddings\.(word_embeddings|position_embeddings)\.", r"Qformer.bert.embeddings.\1."),
    (r"^vision_projection\.", "vision_proj."),
    (r"^text_projection\.", "text_proj."),
    (r"^itm_head\.", "itm_head."),
    (r"^query_tokens$", "query_tokens"),
    (r"^vision_model\.post_layernorm\.", "ln_vision."),
]
_OURS_TO_HF_RULES = [
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.", r"qformer.encoder.layer.\1.\2.attention."),
    (r"^Qformer\.bert\.encoder\.", "qformer.encoder."),
    (r"^Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.", r"embeddings.\1."),
    (r"^vision_proj\.", "vision_projection."),
    (r"^text_proj\.", "text_projection."),
    (r"^itm_head\.", "itm_head."),
    (r"^query_tokens$", "query_tokens"),
    (r"^ln_vision\.", "vision_model.post_layernorm."),
]
# What a stage-1 checkpoint holds that a stage-2 model has no place for (the paper's stage 2 starts from stage 1).
STAGE1_ONLY_PARTS = re.compile(r"^(Qformer\.cls\.|vision_proj\.|text_proj\.|itm_head\.|temp$)")
# Q-Former parts only the text path uses (absent from stage-2 checkpoints; a stage-2 model keeps them only when
# the question also enters the Q-Former).
QFORMER_TEXT_PARTS = re.compile(
    r"^Qformer\.bert\.(embeddings\.(word|position)_embeddings\.|encoder\.layer\.\d+\.(intermediate|output)\.)"
)


def stage1_only(key: str) -> bool:
    """True for a stage-1 tensor a stage-2 model (query path only) may ignore when it loads a stage-1 checkpoint."""
    return bool(STAGE1_ONLY_PARTS.match(key) or QFORMER_TEXT_PARTS.match(key))
# Ours that Hugging Face BLIP-2 has no place for (dropped on export, reported).
_OURS_NOT_IN_HF = re.compile(r"^(temp$|Qformer\.cls\.|Qformer\.bert\.embeddings\.position_ids$)")


def model_layout(model: nn.Module | None = None, text_model_type: str | None = None) -> dict[str, str | None]:
    """Where the HF parts live in our model: ``vision`` prefix (``visual_encoder.``, every BLIP-2 model's),
    ``llm`` prefix (HF LM state dict inside ours; the model's ``LLM_ATTR``) and ``proj`` (our name of
    ``language_projection``). Without a model, the names of ``blip2_opt``/``blip2_t5`` chosen
    by the text model type."""
    if model is None:
        kind = "t5" if text_model_type and "t5" in text_model_type else "opt"
        return {"vision": "visual_encoder.", "llm": DEFAULT_LLM_PREFIXES[kind], "proj": f"{kind}_proj"}
    llm_attr = getattr(model, "LLM_ATTR", None)  # a stage-2 model names the attribute holding its LLM adapter
    llm = llm_attr if llm_attr and isinstance(getattr(model, llm_attr, None), nn.Module) else None
    proj = next((name for name in PROJECTION_NAMES if isinstance(getattr(model, name, None), nn.Linear)), None)
    llm_prefix = None
    if llm is not None:
        inner = getattr(model.get_submodule(llm), "model", None)
        llm_prefix = f"{llm}.model." if isinstance(inner, nn.Module) else f"{llm}."
    return {"vision": "visual_encoder.", "llm": llm_prefix, "proj": proj}


def hf_to_ours(state_dict: Mapping[str, Tensor], layout: Mapping[str, str | None]) -> StateDict:
    """A Hugging Face BLIP-2 state dict -> our names (see ``model_layout`` for ``layout``)."""
    out: StateDict = {}
    vision: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("vision_model.") and not key.startswith("vision_model.post_layernorm."):
            vision[key] = value
        elif key.startswith("language_model."):
            if layout.get("llm") is None:
                raise KeyError(f"checkpoint holds LLM weights ({key}) but the model has no LLM")
            out[layout["llm"] + key.removeprefix("language_model.")] = value
        elif key.startswith("language_projection."):
            if not layout.get("proj"):
                raise KeyError(f"checkpoint holds {key} but the model has no LLM projection ({PROJECTION_NAMES})")
            out[layout["proj"] + key.removeprefix("language_projection")] = value
        elif key == "embeddings.position_ids" or key.endswith(".position_ids"):
            continue  # a constant buffer
        else:
            new = apply_rules(key, _HF_TO_OURS_RULES)
            if new is None:
                raise KeyError(f"unknown Hugging Face BLIP-2 key {key!r}")
            out[new] = value
    out.update({layout["vision"] + k: v for k, v in hf_vision_to_timm(vision).items()})
    return out


def ours_to_hf(state_dict: Mapping[str, Tensor], layout: Mapping[str, str | None]) -> StateDict:
    """Our state dict -> Hugging Face BLIP-2 names (the inverse of ``hf_to_ours``; ``temp`` and the Q-Former LM
    head, which HF BLIP-2 lacks, are dropped)."""
    out: StateDict = {}
    vision: dict[str, Tensor] = {}
    dropped: list[str] = []
    for key, value in state_dict.items():
        if key.startswith(layout["vision"]):
            vision[key.removeprefix(layout["vision"])] = value
        elif layout.get("llm") and key.startswith(layout["llm"]):
            out["language_model." + key.removeprefix(layout["llm"])] = value
        elif layout.get("proj") and key.startswith(layout["proj"] + "."):
            out["language_projection." + key.removeprefix(layout["proj"] + ".")] = value
        elif _OURS_NOT_IN_HF.match(key):
            if not key.endswith("position_ids"):
                dropped.append(key)
            continue
        else:
            new = apply_rules(key, _OURS_TO_HF_RULES)
            if new is None:
                raise KeyError(f"our key {key!r} has no Hugging Face BLIP-2 equivalent")
            out[new] = value
    out.update(timm_vision_to_hf(vision))
    if dropped:
        logger.warning("Hugging Face BLIP-2 has no place for %d tensors (not exported): %s%s", len(dropped),
                       dropped[:4], "..." if len(dropped) > 4 else "")
    return out
