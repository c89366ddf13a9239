"""The model zoo: load a registered model by (arch, model_type) with its processors, LAVIS-style.

    from models import load_model_and_preprocess, model_zoo
    print(model_zoo)                      # every arch and its model types
    model, vis_processors, txt_processors = load_model_and_preprocess("blip2_opt", "tiny", is_eval=True)
    image = vis_processors["eval"](pil_image).unsqueeze(0)

Each model type is a YAML under ``models/configs/`` (``model:`` node + ``preprocess:`` node). Its weight
sources are named there; the default is the Hugging Face hub checkpoint (``weights: hf``), ``weights: lavis``
selects the original LAVIS files. ``build_model_skeleton`` (or ``load_model(..., device="meta")``) instantiates any
type on the ``meta`` device without reading a single weight (the paper LLMs' configs ship with the package), to
count parameters or plan memory.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Iterator, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import registry
from common.precision import cpu_safe_
from models.checkpoints import resolve_source
from models.instructblip_layout import INSTRUCTBLIP_MODEL_TYPES
from models.weight_sources import check_sources

logger = logging.getLogger(__name__)

# Config overrides that switch off every weight read (used on the meta device).
NO_WEIGHTS = {
    "weights": "none",
    "load_pretrained": False,
    "load_finetuned": False,
    "vit_pretrained": None,
    "load_llm_weights": False,
    "bert": None,
    "qformer_bert": None,
}


def _model_class(name: str) -> type:
    return registry.models.get(name)


def _zoo_yaml(name: str, model_type: str) -> DictConfig:
    cls = _model_class(name)
    path = cls.default_config_path(model_type)
    cfg = OmegaConf.load(path)
    if "model" not in cfg:
        raise KeyError(f"{path}: a model zoo YAML needs a top-level 'model:' node")
    return cfg


def load_model(
    name: str,
    model_type: str,
    is_eval: bool = False,
    device: str | torch.device = "cpu",
    checkpoint: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build ``name`` (a registered arch) with the zoo config ``model_type`` and its weights.

    ``checkpoint`` (path, URL or hub id, any supported format) is loaded on top. ``overrides`` are merged into the
    ``model:`` node (e.g. ``weights="lavis"``, ``image_size=364``). On CPU, fp16 weights become fp32.
    ``device="meta"`` builds the architecture only (``build_model_skeleton``): no weight is read or downloaded, and
    the paper LLMs' configs ship with the package, so e.g. ``parameter_counts()`` works offline.
    """
    if torch.device(device).type == "meta":
        if checkpoint is not None:
            raise ValueError(f"load_model(device='meta') builds shapes only; checkpoint={checkpoint!r} cannot be loaded")
        model = build_model_skeleton(name, model_type, **overrides)
        return model.eval() if is_eval else model
    cls = _model_class(name)
    cfg = _zoo_yaml(name, model_type).model
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(dict(overrides)))
    check_weight_sources(name, cfg, label=f"{name}/{model_type}")
    model = cls.from_config(cfg)
    if checkpoint is not None:
        model.load_checkpoint(checkpoint)
    if is_eval:
        model.eval()
    if torch.device(device).type == "cpu":
        cpu_safe_(model, name)
    return model.to(device)


def check_weight_sources(name: str, cfg: DictConfig | Mapping[str, Any], label: str | None = None) -> None:
    """Fail before building anything when a weight source of ``cfg`` is missing and cannot be downloaded now: one
    ``MissingWeightsError`` lists every missing source with its size and the key that points it at a local copy."""
    check_sources(name, cfg, label=label)


def load_preprocess(config: DictConfig | Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``preprocess`` node (``vis_processor``/``text_processor``, each ``train``/``eval``) -> two dicts of processors
    keyed ``"train"``/``"eval"``; an absent entry is the identity processor."""
    identity = registry.processors.get("identity")

    def build(node: Any) -> Any:
        if node is None:
            return identity()
        return registry.processors.get(node["name"]).from_config(
            OmegaConf.create({k: v for k, v in dict(node).items() if k != "name"})
        )

    config = config if config is not None else {}
    vis_cfg = config.get("vis_processor") or {}
    txt_cfg = config.get("text_processor") or {}
    vis = {split: build(vis_cfg.get(split)) for split in ("train", "eval")}
    txt = {split: build(txt_cfg.get(split)) for split in ("train", "eval")}
    return vis, txt


def load_model_and_preprocess(
    name: str, model_type: str, is_eval: bool = False, device: str | torch.device = "cpu", **overrides: Any
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """``load_model`` plus the processors of the same zoo YAML: ``(model, vis_processors, txt_processors)``."""
    model = load_model(name, model_type, is_eval=is_eval, device=device, **overrides)
    preprocess = _zoo_yaml(name, model_type).get("preprocess")
    if preprocess is None:
        logger.warning("%s/%s: no 'preprocess' node in its zoo YAML; using identity processors", name, model_type)
    vis, txt = load_preprocess(preprocess)
    return model, vis, txt


def build_model_skeleton(name: str, model_type: str, **overrides: Any) -> nn.Module:
    """Instantiate ``name``/``model_type`` on the ``meta`` device: full architecture, no weights read or downloaded.

    The frozen LLM's ``config.json`` comes from the package for the paper LLMs (OPT-2.7B/6.7B, Flan-T5-XL/XXL,
    ``models/configs/llm/``), else from the LLM's name (a local dir, or the hub). ``model.parameter_counts()`` then
    reports trainable and total parameters.
    """
    cls = _model_class(name)
    cfg = OmegaConf.merge(_zoo_yaml(name, model_type).model, OmegaConf.create(dict(NO_WEIGHTS, **overrides)))
    with torch.device("meta"):
        return cls.from_config(cfg)


def model_config_from_hf(source: str) -> tuple[str, dict[str, Any]]:
    """(arch, ``model:`` config) that rebuilds a Hugging Face BLIP-2 or InstructBLIP checkpoint (dir, file's dir or
    hub id) as ours.

    ``Blip2ForConditionalGeneration`` with an OPT (or other causal) LM -> ``blip2_opt``; with T5 (or another
    seq2seq LM) -> ``blip2_t5``; ``Blip2ForImageTextRetrieval`` -> ``blip2_image_text_matching``; InstructBLIP (image
    or video) -> ``blip2_vicuna_instruct`` / ``blip2_t5_instruct``. The LLM is built
    from the checkpoint's ``text_config`` (no separate download) and its tokenizer read from the same directory.
    """
    root = resolve_source(source)
    root = root if root.is_dir() else root.parent
    config_path = root / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{root} has no config.json: not a Hugging Face BLIP-2 checkpoint directory")
    hf = json.loads(config_path.read_text())
    instruct = hf.get("model_type") in INSTRUCTBLIP_MODEL_TYPES
    if hf.get("model_type") != "blip-2" and not instruct:
        raise ValueError(f"{config_path}: model_type is {hf.get('model_type')!r}, expected one of "
                         f"{('blip-2', *INSTRUCTBLIP_MODEL_TYPES)}")
    vision, qformer = hf.get("vision_config", {}), hf.get("qformer_config", {})
    width, heads = vision.get("hidden_size", 1408), vision.get("num_attention_heads", 16)
    cfg: dict[str, Any] = {
        "weights": "hf", "hf_hub_id": str(root), "load_pretrained": True, "load_finetuned": False,
        "vit_model": "eva_vit_g", "vit_pretrained": None, "vit_precision": "fp32", "freeze_vit": True,
        "image_size": vision.get("image_size", 224), "ln_vision_eps": vision.get("layer_norm_eps", 1e-6),
        "vit_kwargs": {
            "embed_dim": width, "depth": vision.get("num_hidden_layers", 39), "num_heads": heads,
            "mlp_ratio": vision.get("intermediate_size", 6144) / width, "patch_size": vision.get("patch_size", 14),
        },
        "num_query_token": hf.get("num_query_tokens", 32),
        "cross_attention_freq": qformer.get("cross_attention_frequency", 2),
        "qformer_config": {
            key: qformer[hf_key] for key, hf_key in (
                ("hidden_size", "hidden_size"), ("num_hidden_layers", "num_hidden_layers"),
                ("num_attention_heads", "num_attention_heads"), ("intermediate_size", "intermediate_size"),
                ("hidden_act", "hidden_act"), ("max_position_embeddings", "max_position_embeddings"),
                ("layer_norm_eps", "layer_norm_eps"), ("pad_token_id", "pad_token_id"),
            ) if hf_key in qformer
        },
    }
    architectures = hf.get("architectures") or ["Blip2ForConditionalGeneration"]
    if "Blip2ForImageTextRetrieval" in architectures:
        cfg["embed_dim"] = hf.get("image_text_hidden_size", 256)
        cfg["qformer_config"]["vocab_size"] = qformer.get("vocab_size", 30523)
        return "blip2_image_text_matching", cfg
    text = dict(hf.get("text_config") or {"model_type": "opt"})
    seq2seq = bool(text.get("is_encoder_decoder")) or text.get("model_type") in ("t5", "mt5", "umt5", "bart")
    arch = "blip2_t5" if seq2seq else "blip2_opt"
    llm_key = "t5_model" if seq2seq else "opt_model"
    if instruct:  # InstructBLIP: instruction-aware Q-Former, its BERT tokenizer saved by InstructBlipProcessor
        arch = "blip2_t5_instruct" if seq2seq else "blip2_vicuna_instruct"
        llm_key = "t5_model" if seq2seq else "llm_model"
        cfg["qformer"] = "instruct_qformer"
        cfg["qformer_config"]["vocab_size"] = qformer.get("vocab_size", 30523)
        if (root / "qformer_tokenizer").is_dir():
            cfg["tokenizer"] = str(root / "qformer_tokenizer")
    llm_type = {"t5": "flan_t5", "opt": "opt"}.get(text.get("model_type"), "hf_seq2seq_lm" if seq2seq else "hf_causal_lm")
    cfg.update({
        llm_key: str(root), "llm_type": llm_type, "llm_precision": "fp32", "load_llm_weights": False,
        "llm_kwargs": {"config": text, "tokenizer_name_or_path": str(root)},
    })
    return arch, cfg


def load_hf_blip2(
    source: str, is_eval: bool = True, device: str | torch.device = "cpu", **overrides: Any
) -> nn.Module:
    """Our model with the weights of a Hugging Face BLIP-2 checkpoint (hub id like ``Salesforce/blip2-opt-2.7b``,
    or a local directory), e.g. to compare with ``transformers`` or to fine-tune it here."""
    arch, cfg = model_config_from_hf(source)
    model = _model_class(arch).from_config(OmegaConf.create(dict(cfg, **overrides)))
    if is_eval:
        model.eval()
    if torch.device(device).type == "cpu":
        cpu_safe_(model, source)
    return model.to(device)


class ModelZoo:
    """Every registered arch with zoo types: ``print(model_zoo)``, ``for arch, types in model_zoo``, ``len``."""

    def _entries(self) -> dict[str, list[str]]:
        entries = {}
        for arch in registry.models.list():
            types = list(getattr(registry.models.get(arch), "PRETRAINED_MODEL_CONFIG_DICT", {}) or {})
            if types:
                entries[arch] = types
        return entries

    def __str__(self) -> str:
        rule = "=" * 50
        rows = [f"{name:<30} {', '.join(types)}" for name, types in self._entries().items()]
        return "\n".join([rule, f"{'Architectures':<30} {'Types'}", rule, *rows])

    def __iter__(self) -> Iterator[tuple[str, list[str]]]:
        return iter(self._entries().items())

    def __len__(self) -> int:
        return sum(len(types) for types in self._entries().values())


model_zoo = ModelZoo()
