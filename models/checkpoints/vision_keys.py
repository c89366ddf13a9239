"""Image-encoder checkpoint layouts -> timm names (ours) and back: Hugging Face ``vision_model.*`` (BLIP-2's EVA
tower), OpenAI CLIP visual towers (``conv1``, ``transformer.resblocks.i.*``; LAVIS ``clip_vit_L.pth``) and
LAVIS/timm EVA (already timm's names).
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

from models.checkpoints.sources import StateDict

_HF_VISION_RULES = [  # (HF vision_model suffix regex, timm replacement)
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.position_embedding$", "pos_embed"),
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.weight$", r"blocks.\1.attn.qkv.weight"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.q_bias$", r"blocks.\1.attn.q_bias"),  # transformers < 4.30 layout
    (r"^encoder\.layers\.(\d+)\.self_attn\.v_bias$", r"blocks.\1.attn.v_bias"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc(\d)\.", r"blocks.\1.mlp.fc\2."),
]
_OPENAI_CLIP_RULES = [  # (OpenAI / LAVIS clip_vit_L suffix regex, timm replacement)
    (r"^conv1\.weight$", "patch_embed.proj.weight"),
    (r"^class_embedding$", "cls_token"),
    (r"^positional_embedding$", "pos_embed"),
    (r"^ln_pre\.", "norm_pre."),
    (r"^transformer\.resblocks\.(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"^transformer\.resblocks\.(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$", r"blocks.\1.attn.qkv.weight"),
    (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_bias$", r"blocks.\1.attn.qkv.bias"),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2."),
]
# Present in full-network files but not in BLIP-2's truncated encoders (final norm, heads, projections).
_VISION_DROPPED = re.compile(r"^(norm|fc_norm|head|ln_post|proj|lm_head|rope|post_layernorm)(\.|$)")


def apply_rules(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, repl in rules:
        new, count = re.subn(pattern, repl, key)
        if count:
            return new
    return None


def is_vision_key(name: str) -> bool:
    """False for tensors of a full BLIP-2 checkpoint that an image encoder never needs (LLM, Q-Former, heads)."""
    return not name.startswith(("language_model.", "qformer.", "Qformer.", "opt_model.", "t5_model.", "llm_model.",
                                "language_projection.", "embeddings.", "query_tokens"))


def hf_vision_to_timm(state_dict: Mapping[str, Tensor]) -> StateDict:
    """HF ``Blip2VisionModel`` tensors (prefix ``vision_model.`` optional) -> timm EVA names.

    ``qkv.bias`` is ``cat(q_bias, k_bias, v_bias)``; EVA has no key bias, and a key bias only adds a per-query
    constant to the attention logits (softmax-invariant), so dropping it changes nothing.
    """
    out: StateDict = {}
    for key, value in state_dict.items():
        key = key.removeprefix("vision_model.")
        match = re.match(r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$", key)
        if match:
            q_bias, _, v_bias = value.chunk(3)
            out[f"blocks.{match.group(1)}.attn.q_bias"] = q_bias.clone()
            out[f"blocks.{match.group(1)}.attn.v_bias"] = v_bias.clone()
            continue
        new = apply_rules(key, _HF_VISION_RULES)
        if new is None:
            if _VISION_DROPPED.match(key):
                continue
            raise KeyError(f"unknown Hugging Face vision_model key {key!r}")
        out[new] = value
    return out


def timm_vision_to_hf(state_dict: Mapping[str, Tensor]) -> StateDict:
    """timm EVA (or plain ViT) names -> HF ``vision_model.*`` names (EVA's qkv bias is cat(q_bias, 0, v_bias))."""
    inverse = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
    }
    out: StateDict = {}
    for key, value in state_dict.items():
        if key in inverse:
            out[f"vision_model.{inverse[key]}"] = value
            continue
        if key.startswith("patch_embed.proj."):
            out["vision_model.embeddings.patch_embedding." + key.removeprefix("patch_embed.proj.")] = value
            continue
        match = re.match(r"^blocks\.(\d+)\.(.+)$", key)
        if not match:
            raise KeyError(f"image encoder key {key!r} has no Hugging Face BLIP-2 equivalent (EVA layout expected)")
        layer, rest = match.groups()
        prefix = f"vision_model.encoder.layers.{layer}."
        if rest == "attn.q_bias":
            v_bias = state_dict[f"blocks.{layer}.attn.v_bias"]
            out[prefix + "self_attn.qkv.bias"] = torch.cat([value, torch.zeros_like(value), v_bias])
        elif rest == "attn.v_bias":
            continue
        else:
            rest = re.sub(r"^norm(\d)\.", r"layer_norm\1.", rest)
            rest = rest.replace("attn.qkv.", "self_attn.qkv.").replace("attn.proj.", "self_attn.projection.")
            # (a plain timm ViT's full ``attn.qkv.bias`` maps to HF's qkv.bias as it is)
            if not re.match(r"^(layer_norm[12]|self_attn\.(qkv|projection)|mlp\.fc[12])\.", rest):
                raise KeyError(f"image encoder key {key!r} has no Hugging Face BLIP-2 equivalent")
            out[prefix + rest] = value
    return out


def openai_clip_to_timm(state_dict: Mapping[str, Tensor]) -> StateDict:
    """OpenAI CLIP visual tower (``visual.`` prefix optional; LAVIS ``clip_vit_L.pth``) -> timm ViT names."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if not key.startswith("visual.") and any(k.startswith("visual.") for k in state_dict):
            continue  # a full CLIP checkpoint: skip the text tower
        key = key.removeprefix("visual.")
        new = apply_rules(key, _OPENAI_CLIP_RULES)
        if new is None:
            if _VISION_DROPPED.match(key):
                continue
            raise KeyError(f"unknown OpenAI CLIP visual key {key!r}")
        if new == "cls_token":
            value = value.reshape(1, 1, -1)  # [W] -> [1, 1, W]
        elif new == "pos_embed" and value.ndim == 2:
            value = value.unsqueeze(0)  # [N, W] -> [1, N, W]
        out[new] = value
    return out


def visual_encoder_part(state_dict: Mapping[str, Tensor]) -> StateDict:
    """The image encoder's tensors of a full BLIP-2 state dict (``visual_encoder.*``), prefix removed; a state dict
    without that prefix is returned as it is."""
    if not any(k.startswith("visual_encoder.") for k in state_dict):
        return dict(state_dict)
    return {k.removeprefix("visual_encoder."): v for k, v in state_dict.items() if k.startswith("visual_encoder.")}


def vision_state_dict_to_timm(state_dict: Mapping[str, Tensor], depth: int | None = None) -> StateDict:
    """Any image-encoder layout -> timm names: HF ``vision_model.*``, OpenAI/LAVIS CLIP, LAVIS/timm EVA, or a
    full BLIP-2 state dict (its ``visual_encoder.*`` part). Blocks ``>= depth`` (the dropped last block of the
    original network) and final norms/heads are removed."""
    keys = list(state_dict)
    if any(k.startswith("visual_encoder.") for k in keys):
        state_dict = visual_encoder_part(state_dict)
    elif any(k.startswith("vision_model.") for k in keys):
        state_dict = {k: v for k, v in state_dict.items() if k.startswith("vision_model.")}
    keys = list(state_dict)
    if any(k.startswith("vision_model.") for k in keys):
        converted = hf_vision_to_timm(state_dict)
    elif any(k.startswith(("conv1.", "visual.", "transformer.resblocks.")) or k == "class_embedding" for k in keys):
        converted = openai_clip_to_timm(state_dict)
    else:
        converted = {k: v for k, v in state_dict.items() if not _VISION_DROPPED.match(k)}
    if depth is not None:
        block = re.compile(r"^blocks\.(\d+)\.")
        converted = {k: v for k, v in converted.items() if not (m := block.match(k)) or int(m.group(1)) < depth}
    return converted
