"""Checkpoint formats and the one key mapping between our parameter names and the other layouts.

Our names are LAVIS's (``query_tokens``, ``ln_vision``, ``Qformer.bert.*``, ``vision_proj``, ``opt_proj``, ...;
EVA ViT keys are timm's, which equal LAVIS's ``eva_vit_g.pth``). This module knows three more layouts:

* LAVIS ``.pth`` files: ``{"model": state_dict}`` (trainable parts only; the ViT lives in ``eva_vit_g.pth`` /
  ``clip_vit_L.pth``, the LLM on the hub). Their names are ours; a trained CLIP ViT-L inside one is renamed to timm's.
  Our LLM weights sit at ``<opt_model|t5_model>.model.*`` (the frozen adapter wraps the HF model as ``.model``).
* Hugging Face BLIP-2 (``Blip2ForConditionalGeneration`` / ``Blip2ForImageTextRetrieval``; safetensors, sharded or
  not, or ``pytorch_model.bin``): ``vision_model.*``, ``qformer.*``, ``language_projection``, ``language_model.*``;
  Hugging Face InstructBLIP (image and video) differs only in its Q-Former embeddings (``models/instructblip_layout.py``).
* OpenAI CLIP visual towers (``conv1``, ``transformer.resblocks.i.*``) for the CLIP ViT-L encoder.

Sources are local files or directories, ``http(s)://`` URLs (cached in the torch hub cache) or Hugging Face hub
ids (``Salesforce/blip2-opt-2.7b``, optionally ``@revision``), downloaded through ``huggingface_hub`` which honours
``HF_HUB_OFFLINE``. Only safetensors and ``torch.load(weights_only=True)`` are used to read weights.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from models.instructblip_layout import instructblip_to_blip2, is_instructblip_layout

logger = logging.getLogger(__name__)

StateDict = dict[str, Tensor]

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


# ---------------------------------------------------------------------------------------------------------------
# Sources: local path, URL or hub id -> local file or directory
# ---------------------------------------------------------------------------------------------------------------
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_source(source: str | os.PathLike) -> Path:
    """A local path as is; a URL downloaded once into ``$TORCH_HOME/hub/checkpoints``; a hub id as a snapshot dir."""
    text = os.path.expanduser(str(source))
    if os.path.exists(text):
        return Path(text)
    if text.startswith(("http://", "https://")):
        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(text.split("?")[0])
        if target.exists():
            return target
        if _offline():
            raise FileNotFoundError(
                f"{text} is not in the download cache ({target}) and HF_HUB_OFFLINE is set; "
                "download it elsewhere and pass the local path"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s -> %s", text, target)
        torch.hub.download_url_to_file(text, str(target), progress=True)  # writes a temp file, then renames
        return target
    if _HUB_ID.match(text) and not text.endswith((".pth", ".pt", ".bin", ".safetensors", ".json")):
        from huggingface_hub import snapshot_download

        repo_id, _, revision = text.partition("@")
        try:
            return Path(
                snapshot_download(
                    repo_id,
                    revision=revision or None,
                    allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
                )
            )
        except Exception as err:  # offline without cache, unknown repo, no network ...
            raise FileNotFoundError(
                f"cannot get Hugging Face hub checkpoint {text!r} ({type(err).__name__}: {err}); "
                "pass a local directory or file instead"
            ) from err
    raise FileNotFoundError(
        f"checkpoint source {str(source)!r} is neither an existing file/directory, an http(s) URL, "
        "nor a Hugging Face hub id like 'Salesforce/blip2-opt-2.7b'"
    )


def _torch_file_state(path: Path) -> Mapping[str, Tensor]:
    """The state dict of a ``torch.save`` file, memory-mapped where the format allows (tensors read on use)."""
    try:
        try:  # mmap: tensors that are never selected are never read from disk
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err) and "zipfile" not in str(err):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as err:
        raise ValueError(
            f"cannot read checkpoint {path} with torch.load(weights_only=True) ({err}); arbitrary pickles are "
            "refused for safety: re-save it as a plain state dict or safetensors"
        ) from err
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]  # LAVIS / our runner checkpoints: {"model": sd, "optimizer": ..., ...}
    elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict (name -> tensor), nor one under 'model'")
    return obj


def _load_file(path: Path, select: Callable[[str], bool] | None = None) -> StateDict:
    """One weight file; ``select(name)`` keeps a subset without reading the rest (safetensors / mmap)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys() if select is None or select(k)}
    return {k: v for k, v in _torch_file_state(path).items() if select is None or select(k)}


def _file_keys(path: Path) -> list[str]:
    """Tensor names of one weight file, without reading the tensors."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return list(handle.keys())
    return list(_torch_file_state(path))


def _weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint: the file itself, or a directory's HF shards, single HF file, or one
    ``*.safetensors`` / ``*.pth`` file."""
    if path.is_file():
        return [path]
    for index_name in HF_INDEX_FILES:
        index = path / index_name
        if index.exists():
            return [path / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    for name in HF_WEIGHT_FILES:
        if (path / name).exists():
            return [path / name]
    candidates = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.pth"))
    if len(candidates) == 1:
        return candidates
    raise FileNotFoundError(
        f"no weights in directory {path}: expected one of {HF_INDEX_FILES + HF_WEIGHT_FILES} "
        f"or a single *.safetensors / *.pth file (found {[p.name for p in candidates]})"
    )


def read_state_dict(source: str | os.PathLike, select: Callable[[str], bool] | None = None) -> StateDict:
    """Raw tensors of a checkpoint (no renaming); a directory may hold HF shards, one file, or ``*.safetensors``.
    ``select(name) -> bool`` reads only part of it (e.g. the vision tower of a full BLIP-2 checkpoint)."""
    state: StateDict = {}
    for file in _weight_files(resolve_source(source)):
        state.update(_load_file(file, select))
    return state


def detect_format(state_dict: Mapping[str, Tensor] | Iterable[str]) -> str:
    """``"hf"`` (Hugging Face BLIP-2), ``"ours"`` (ours = LAVIS names) or ``"vision"`` (an image encoder alone), from
    a state dict or its names."""
    keys = list(state_dict)
    if any(k.startswith(("qformer.", "vision_model.", "language_projection.")) for k in keys):
        return "hf"
    if any(k.startswith(("Qformer.", "query_tokens", "ln_vision.", "visual_encoder.")) for k in keys):
        return "ours"
    return "vision"


# ---------------------------------------------------------------------------------------------------------------
# Image encoder layouts -> timm names
# ---------------------------------------------------------------------------------------------------------------
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


def _apply_rules(key: str, rules: list[tuple[str, str]]) -> str | None:
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
        new = _apply_rules(key, _HF_VISION_RULES)
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
        new = _apply_rules(key, _OPENAI_CLIP_RULES)
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


# ---------------------------------------------------------------------------------------------------------------
# Whole BLIP-2 models: Hugging Face <-> ours
# ---------------------------------------------------------------------------------------------------------------
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
# Stage-1-only parts: a stage-2 model (query path only) ignores them when it loads a stage-1 checkpoint.
_STAGE1_ONLY = re.compile(
    r"^(Qformer\.cls\.|Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\."
    r"|Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.|vision_proj\.|text_proj\.|itm_head\.|temp$)"
)
# Ours that Hugging Face BLIP-2 has no place for (dropped on export, reported).
_OURS_NOT_IN_HF = re.compile(r"^(temp$|Qformer\.cls\.|Qformer\.bert\.embeddings\.position_ids$)")


def _find_submodule(model: nn.Module, kind: str) -> str | None:
    """Dotted name of the first submodule of a kind: 'vision' (an image encoder) or 'llm' (a frozen LLM adapter)."""
    from models.image_encoders import TimmImageEncoder

    classes: tuple[type, ...]
    if kind == "vision":
        classes = (TimmImageEncoder,)
    else:
        from models.llms import FrozenLLM

        classes = (FrozenLLM,)
    for name, module in model.named_modules():
        if name and isinstance(module, classes):
            return name
    return None


def model_layout(model: nn.Module | None = None, text_model_type: str | None = None) -> dict[str, str | None]:
    """Where the HF parts live in our model: ``vision`` prefix, ``llm`` prefix (HF LM state dict inside ours) and
    ``proj`` (our name of ``language_projection``). Without a model, the names of ``blip2_opt``/``blip2_t5`` chosen
    by the text model type."""
    if model is None:
        kind = "t5" if text_model_type and "t5" in text_model_type else "opt"
        return {"vision": "visual_encoder.", "llm": DEFAULT_LLM_PREFIXES[kind], "proj": f"{kind}_proj"}
    vision = _find_submodule(model, "vision") or "visual_encoder"
    llm = _find_submodule(model, "llm")
    proj = next((name for name in PROJECTION_NAMES if isinstance(getattr(model, name, None), nn.Linear)), None)
    llm_prefix = None
    if llm is not None:
        inner = getattr(model.get_submodule(llm), "model", None)
        llm_prefix = f"{llm}.model." if isinstance(inner, nn.Module) else f"{llm}."
    return {"vision": f"{vision}.", "llm": llm_prefix, "proj": proj}


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
            new = _apply_rules(key, _HF_TO_OURS_RULES)
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
            new = _apply_rules(key, _OURS_TO_HF_RULES)
            if new is None:
                raise KeyError(f"our key {key!r} has no Hugging Face BLIP-2 equivalent")
            out[new] = value
    out.update(timm_vision_to_hf(vision))
    if dropped:
        logger.warning("Hugging Face BLIP-2 has no place for %d tensors (not exported): %s%s", len(dropped),
                       dropped[:4], "..." if len(dropped) > 4 else "")
    return out


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
            unused = {k for k in raw if k not in self.own and _STAGE1_ONLY.match(k)}
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
    files = _weight_files(resolve_source(source))
    names = {file: _file_keys(file) for file in files}
    to_ours = _ToOurNames([k for file in files for k in names[file]], source, model)
    for file in files:
        for start in range(0, len(names[file]), piece_size):
            piece = set(names[file][start : start + piece_size])
            # the file is opened (memory-mapped) per piece on purpose: closing it unmaps the pages read so far, so
            # they do not add up in the process's memory while the model fills
            yield to_ours(_load_file(file, piece.__contains__))
    to_ours.report()


def export_to_hf(model: nn.Module, out_dir: str | os.PathLike, save_processor: bool = True, video: bool = False) -> Path:
    """Write ``model`` as a Hugging Face BLIP-2 / InstructBLIP checkpoint directory (``models.hf_export``)."""
    from models.hf_export import export_to_hf as _export

    return _export(model, out_dir, save_processor=save_processor, video=video)
