"""Using a trained model: the model spec users type, and the operations ``runners.predict`` and ``runners.serve`` share.

A model spec is one of

- ``ARCH:TYPE`` from the model zoo (``blip2_opt:tiny``, ``blip2_t5:pretrain_flant5xl``, ``blip2:pretrain``);
- a training job directory (``output/<job>``, holding ``config.yaml``): its ``checkpoint_best`` or newest step
  checkpoint; or one checkpoint directory inside a job (``output/<job>/checkpoints/step_00000100``);
- a Hugging Face BLIP-2 directory (``config.json`` with ``model_type: blip-2``).

``Predictor`` wraps the model with its eval image processor and runs, on PIL images: captions, answers, ITM match
probabilities, ITC similarities and image features. Stage-2 models (``blip2_opt``, ``blip2_t5``) caption and answer;
stage-1 models (``blip2``, ``blip2_feature_extractor``, ``blip2_image_text_matching``) caption with the Q-Former
decoder, score image-text pairs and give features.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn

import registry
from common.precision import PRECISIONS, autocast, compute_dtype, cpu_safe_, precision_dtype
from runners import checkpointing as ckpt
from runners.checkpointing import step_checkpoints

logger = logging.getLogger(__name__)

#: ``--precision int8_dynamic``: fbgemm dynamic int8 linear layers in the ViT, the Q-Former and the LLM (CPU only)
INT8_DYNAMIC = "int8_dynamic"
#: the ``--precision`` values of ``blip2-predict`` and the web server (``load_spec``'s ``precision``)
PRECISION_CHOICES = (*PRECISIONS, INT8_DYNAMIC)
PRECISION_HELP = ("fp32, bf16, fp16: frozen parts stored and computed in this precision (fp16 without CUDA computes "
                  "in fp32); int8_dynamic (CPU only): the linear layers of the image encoder, Q-Former and LLM with "
                  "dynamic int8, the rest fp32 (--options vit_precision=... or llm_kwargs.quantization=... override "
                  "its parts)")


class ModelSpecError(ValueError):
    """A model spec that names no zoo model, job directory or checkpoint."""


# -- model specs --------------------------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; a CUDA device without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def check_precision(precision: str, device: torch.device) -> torch.dtype:
    """``--precision`` -> the dtype that computes: ``common.precision``'s rule (fp16 off CUDA computes in fp32, with a
    warning); ``int8_dynamic`` computes in fp32 and runs on CPU only."""
    if precision == INT8_DYNAMIC:
        if device.type != "cpu":
            raise ValueError(f"--precision {INT8_DYNAMIC} runs on CPU only (fbgemm dynamic int8); the device is "
                             f"{device}: use --device cpu, or --precision {', '.join(PRECISIONS)} on {device}")
        return torch.float32
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}; got {precision!r}")
    return compute_dtype(precision_dtype(precision, "--precision"), device.type == "cuda", "--precision")


def precision_overrides(precision: str, dtype: torch.dtype, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The model config overrides ``--precision`` implies, under the user's: a key the user sets wins.

    A half precision stores the frozen ViT and LLM in it. ``int8_dynamic`` sets ``vit_precision: int8_dynamic``,
    ``llm_precision: fp32`` and ``llm_kwargs.quantization: int8_dynamic``; that one key is merged into the user's
    ``llm_kwargs`` (and, as every override, into the spec's own). Models without an LLM ignore the LLM keys."""
    overrides = dict(overrides or {})
    if precision == INT8_DYNAMIC:
        overrides.setdefault("vit_precision", INT8_DYNAMIC)
        overrides.setdefault("llm_precision", "fp32")
        overrides["llm_kwargs"] = {"quantization": INT8_DYNAMIC, **dict(overrides.get("llm_kwargs") or {})}
    elif dtype != torch.float32:  # frozen parts stored in half precision; the rest runs under autocast
        overrides.setdefault("vit_precision", precision)
        overrides.setdefault("llm_precision", precision)
    return overrides


def _job_checkpoint(job_dir: Path) -> Path:
    """``checkpoint_best`` of a job if present, else its newest step checkpoint."""
    best = job_dir / "checkpoint_best" / ckpt.MODEL_FILE
    if best.exists():
        return best
    latest = ckpt.latest_checkpoint(job_dir)
    if latest is None or not (latest / ckpt.MODEL_FILE).exists():
        raise ModelSpecError(f"job directory {job_dir} holds no checkpoint (checkpoint_best/ or checkpoints/step_*/)")
    return latest / ckpt.MODEL_FILE


def _job_model_config(job_dir: Path) -> DictConfig:
    cfg = OmegaConf.load(job_dir / "config.yaml")
    if "model" not in cfg or not cfg.model.get("arch"):
        raise ModelSpecError(f"{job_dir / 'config.yaml'} has no model.arch: not a training job's config")
    model = cfg.model
    # The job checkpoint holds every trained tensor; a LAVIS-style starting checkpoint it was trained from is not
    # needed (and may be gone). Frozen parts still come from their own sources (vit_pretrained, the LLM), and so does
    # a LoRA-adapted Q-Former's frozen base: from the starting checkpoint.
    lora = model.get("lora") or {}
    targets = [lora.get("target", "llm")] if isinstance(lora.get("target", "llm"), str) else list(lora.get("target"))
    if (model.get("weights") or "lavis") == "lavis" and not (lora and "qformer" in targets):
        model.load_pretrained = False
        model.load_finetuned = False
    return cfg


def _eval_vis_processor(cfg: DictConfig | None, image_size: int):
    """The eval image processor of a job's first dataset, else ``blip_image_eval`` at the model's image size."""
    for node in (cfg.get("datasets") or {}).values() if cfg is not None else ():
        proc = (node or {}).get("vis_processor", {}).get("eval") if node is not None else None
        if proc is not None and proc.get("name"):
            args = {k: v for k, v in OmegaConf.to_container(proc).items() if k != "name"}
            return registry.processors.get(proc.name).from_config(OmegaConf.create(args))
    return registry.processors.get("blip_image_eval")(image_size=int(image_size))


def load_spec(
    spec: str, device: str | torch.device = "cpu", precision: str = "fp32",
    checkpoint: str | None = None, overrides: Mapping[str, Any] | None = None,
) -> "Predictor":
    """Build the model a spec names (see the module docstring), in eval mode on ``device``. ``precision``: one of
    ``PRECISION_CHOICES`` (``precision_overrides``); with ``int8_dynamic`` the Q-Former is quantised too, after the
    weights are loaded (``quantize_for_inference``)."""
    from models import zoo  # models (transformers: seconds) loads with the first model

    device = resolve_device(device) if isinstance(device, str) else device
    dtype = check_precision(precision, device)
    overrides = precision_overrides(precision, dtype, overrides)
    path = Path(spec).expanduser()
    if path.exists():
        if (path / "config.yaml").exists() or (path.parent.parent / "config.yaml").exists() and (
            path / "model.safetensors"
        ).exists():
            job_dir = path if (path / "config.yaml").exists() else path.parent.parent
            cfg = _job_model_config(job_dir)
            weights = _job_checkpoint(job_dir) if job_dir == path else path / "model.safetensors"
            model_cfg = OmegaConf.merge(cfg.model, OmegaConf.create(overrides))
            zoo.check_weight_sources(model_cfg.arch, model_cfg, label=str(job_dir))
            model = registry.models.get(model_cfg.arch).from_config(model_cfg)
            model.load_checkpoint(str(weights))
            vis = _eval_vis_processor(cfg, model_cfg.get("image_size", 224))
            name = f"{job_dir.name} ({weights.parent.name})"
        elif (path / "config.json").exists():
            _, hf_cfg = zoo.model_config_from_hf(str(path))
            model = zoo.load_hf_blip2(str(path), **overrides)
            vis = _eval_vis_processor(None, hf_cfg["image_size"])
            name = str(path)
        else:
            raise ModelSpecError(f"{path}: a directory with neither config.yaml (a training job), model.safetensors "
                                 "inside a job's checkpoints/, nor config.json (a Hugging Face BLIP-2 checkpoint)")
    elif ":" in spec:
        arch, _, model_type = spec.partition(":")
        if arch not in registry.models.list():
            raise ModelSpecError(f"model {spec!r}: unknown arch {arch!r}; the zoo has\n{zoo.model_zoo}")
        types = getattr(registry.models.get(arch), "PRETRAINED_MODEL_CONFIG_DICT", {}) or {}
        if model_type not in types:
            raise ModelSpecError(f"model {spec!r}: {arch} has no type {model_type!r}; choose one of {sorted(types)}")
        model, vis_processors, _ = zoo.load_model_and_preprocess(arch, model_type, is_eval=True, **overrides)
        vis = vis_processors["eval"]
        name = spec
    else:
        raise ModelSpecError(f"model {spec!r} is neither ARCH:TYPE from the zoo (e.g. blip2_opt:tiny) nor an "
                             f"existing directory (a training job, a checkpoint or a Hugging Face BLIP-2 export)")
    if checkpoint:
        model.load_checkpoint(checkpoint)
    model.eval()
    if device.type == "cpu":
        cpu_safe_(model, name)
    if precision == INT8_DYNAMIC and hasattr(model, "Qformer"):
        from models.quantize import quantize_for_inference  # the models package: loaded with the first model

        quantize_for_inference(model)
    return Predictor(model.to(device), vis, device, dtype, name)


def default_serve_specs(root: str | Path = ".") -> tuple[str, str]:
    """(generative model, matching model) for the web page: the newest trained stage-2 and stage-1 jobs under
    ``<root>/output`` (a job directory with ``config.yaml`` and a step checkpoint), else the offline ``tiny`` zoo
    models."""
    kinds = {"blip2_opt": 0, "blip2_t5": 0, "blip2": 1, "blip2_feature_extractor": 1, "blip2_image_text_matching": 1}
    found: list[str | None] = [None, None]
    configs = sorted(Path(root, "output").glob("**/config.yaml"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in configs:
        arch = (OmegaConf.load(path).get("model") or {}).get("arch")
        kind = kinds.get(arch)
        if kind is not None and found[kind] is None and step_checkpoints(path.parent):
            found[kind] = str(path.parent)
    return found[0] or "blip2_opt:tiny", found[1] or "blip2:tiny"


# -- inference ----------------------------------------------------------------------------------------------------
@dataclass
class Predictor:
    """A model in eval mode with its eval image processor; every method takes PIL images."""

    model: nn.Module
    vis_processor: Any
    device: torch.device
    dtype: torch.dtype = torch.float32
    name: str = ""
    _lock: Any = field(default=None, repr=False)

    @property
    def is_generative(self) -> bool:
        """A stage-2 model (frozen LLM): captions and answers questions."""
        return hasattr(self.model, "predict_answers")

    @property
    def can_match(self) -> bool:
        """A stage-1 model: ITM/ITC scores, features and search."""
        return hasattr(self.model, "itm_head") and hasattr(self.model, "image_retrieval_features")

    def require(self, what: str) -> None:
        ok = {"caption": hasattr(self.model, "generate"), "vqa": self.is_generative,
              "match": self.can_match}[what]
        if not ok:
            need = {"caption": "a model that generates text", "vqa": "a stage-2 model (blip2_opt, blip2_t5)",
                    "match": "a stage-1 model (blip2, blip2_feature_extractor, blip2_image_text_matching)"}[what]
            raise ValueError(f"{what} needs {need}; {self.name or type(self.model).__name__} "
                             f"({type(self.model).__name__}) is not one")

    def _autocast(self):
        return autocast(self.device, self.dtype)

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> [B, 3, S, S] on the model's device."""
        return torch.stack([self.vis_processor(img) for img in images]).to(self.device)

    @torch.no_grad()
    def caption(self, images: Sequence[Image.Image], prompt: str | None = None, **decoding: Any) -> list[list[str]]:
        """``num_captions`` captions per image; ``decoding`` as the model's ``generate`` takes them."""
        self.require("caption")
        samples: dict[str, Any] = {"image": self.pixels(images)}
        if prompt:
            samples["prompt"] = prompt
        n = int(decoding.get("num_captions", 1))
        with self._autocast():
            texts = self.model.generate(samples, **decoding)
        return [texts[i * n : (i + 1) * n] for i in range(len(images))]

    @torch.no_grad()
    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], prompt: str = "",
               **decoding: Any) -> list[str]:
        """One answer per (image, question) row (``predict_answers``: generate, or rank with an answer_list)."""
        self.require("vqa")
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        samples = {"image": self.pixels(images), "text_input": list(questions)}
        with self._autocast():
            return self.model.predict_answers(samples, prompt=prompt, **decoding)

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_feats [B, Q, E] L2-normalised, image_embeds [B, N, W] after ln_vision)."""
        self.require("match")
        with self._autocast():
            feats, embeds = self.model.image_retrieval_features(self.pixels(images))
        return feats.float(), embeds

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text_feat [T, E] L2-normalised, text_ids [T, L], text_atts [T, L])."""
        self.require("match")
        with self._autocast():
            feat, ids, atts = self.model.text_retrieval_features(list(texts))
        return feat.float(), ids, atts

    @staticmethod
    def itc_similarity(image_feats: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
        """[B, T] cosine similarity, max over queries (LAVIS ``match_head="itc"``, before the temperature)."""
        return torch.einsum("bqe,te->bqt", image_feats, text_feat).amax(dim=1)

    @torch.no_grad()
    def itm_probability(self, image_embeds: torch.Tensor, text_ids: torch.Tensor,
                        text_atts: torch.Tensor) -> torch.Tensor:
        """[B, T] match probability: softmax of the ITM head's 2 logits (mean over queries), every image x text."""
        self.require("match")
        model = self.model
        b, t = image_embeds.shape[0], text_ids.shape[0]
        keep = int(text_atts.sum(1).max().item())
        ids = text_ids[:, :keep].repeat(b, 1)  # rows: image 0 x all texts, image 1 x all texts, ...
        atts = text_atts[:, :keep].repeat(b, 1)
        index = torch.arange(b, device=image_embeds.device).repeat_interleave(t)
        with self._autocast():
            kv = model.select_image_key_values(model.Qformer.bert.image_key_values(image_embeds), index)
            num_query = model.query_tokens.shape[1]
            out = model.query_features(None, ids, atts, image_key_values=kv).last_hidden_state[:, :num_query]
            logits = model.itm_head(out).mean(dim=1).float()  # [B*T, 2]
        return F.softmax(logits, dim=-1)[:, 1].view(b, t)

    def scores(self, images: Sequence[Image.Image], texts: Sequence[str], heads: Sequence[str] = ("itm", "itc")
               ) -> dict[str, torch.Tensor]:
        """{head: [B, T]} for every image x text pair."""
        feats, embeds = self.image_features(images)
        text_feat, ids, atts = self.text_features(texts)
        out = {}
        if "itm" in heads:
            out["itm"] = self.itm_probability(embeds, ids, atts)
        if "itc" in heads:
            out["itc"] = self.itc_similarity(feats, text_feat)
        return out
