"""``Blip2Base``: the one code path every BLIP-2 model shares.

image [B,3,S,S] -> frozen image encoder [B,N,W] -> ``ln_vision`` -> Q-Former queries [B,Q,H]

It owns building the image encoder (through ``registry.image_encoders``), ``ln_vision``, the Q-Former and
``query_tokens``; freezing (requires_grad off, eval kept after ``.train()``, no_grad); ViT precision; and the
optional frozen-feature hook (``samples["image_embeds"]`` = precomputed encoder output, before ``ln_vision``).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

import registry
from common.precision import PRECISIONS, autocast, compute_dtype, cpu_safe_, resolve_precision
from models.assets import PACKAGE_PREFIX
from models.base_model import BaseModel, block_index, config_kwargs, parameter_names
from models.feature_cache import FeatureCacheBusy, FrozenFeatureCache, encoder_fingerprint
from models.quantize import quantize_image_encoder
from models.qformer import QFormer
from models.qformer_config import QFormerConfig, QFormerOutput
from models.qformer_init import init_tokenizer

logger = logging.getLogger(__name__)

# LAVIS spellings of the encoder names -> our registry names.
VIT_ALIASES = {"eva_clip_g": "eva_vit_g", "clip_L": "clip_vit_l"}


#: ``vit_precision`` values beyond the dtypes: a frozen encoder's linear layers quantised (``models/quantize.py``)
VIT_QUANTIZATION = ("int8_dynamic",)


def resolve_vit_precision(precision: str, freeze: bool) -> str:
    """Validate ``vit_precision`` and apply ``common.precision``'s rule (fp16 without CUDA becomes fp32).
    ``int8_dynamic`` (fbgemm dynamic int8 linear layers, CPU inference) needs a frozen encoder."""
    if precision in VIT_QUANTIZATION:
        if not freeze:
            raise ValueError(f"model.vit_precision={precision} quantises a frozen image encoder and needs "
                             "freeze_vit: true; a trainable one takes fp32, bf16 or fp16")
        return precision
    if precision not in (None, "auto", *PRECISIONS):
        raise ValueError(f"model.vit_precision must be one of auto, {', '.join(PRECISIONS)}, "
                         f"{', '.join(VIT_QUANTIZATION)}; got {precision!r}")
    dtype = resolve_precision(precision, what="model.vit_precision")
    precision = next(name for name, value in PRECISIONS.items() if value == dtype)
    if precision != "fp32" and not freeze:
        logger.warning("vit_precision=%s with a trainable ViT: half-precision weights are not trained well; "
                       "LAVIS fine-tuning configs use fp32", precision)
    return precision


def _local_bert(bert: str | None) -> str | None:
    """``bert`` when it names a local checkpoint (a directory or ``package:`` name), else None (hub ids are not
    fetched just for their sizes: a checkpoint of a hub BERT is shaped by ``qformer_config``, BERT-base by default)."""
    if isinstance(bert, str) and (bert.startswith(PACKAGE_PREFIX) or os.path.isdir(os.path.expanduser(bert))):
        return bert
    return None


def to_plain(cfg: DictConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


class Blip2Base(BaseModel):
    """Shared BLIP-2 machinery; subclasses call the ``init_*`` builders in their ``__init__``."""

    visual_encoder: nn.Module
    ln_vision: nn.LayerNorm
    Qformer: QFormer
    query_tokens: nn.Parameter
    #: read by ``weight_plan`` (where the weights come from), not by a constructor
    EXTRA_CONFIG_KEYS = ("weights", "hf_hub_id")

    # -- builders ----------------------------------------------------------------------------------------------------
    @staticmethod
    def init_tokenizer(source: str | None = "bert-base-uncased", truncation_side: str = "right", bert: str | None = None):
        """The Q-Former tokenizer + ``[DEC]``: ``source``, or when None the BERT checkpoint's own (``bert``), else
        bert-base-uncased (30523 tokens); see ``models.qformer_init.init_tokenizer``."""
        return init_tokenizer(source if source is not None else (bert or "bert-base-uncased"), truncation_side)

    def init_vision_encoder(
        self,
        vit_model: str = "eva_clip_g",
        image_size: int = 224,
        drop_path_rate: float = 0.0,
        use_grad_checkpoint: bool = False,
        vit_precision: str = "fp16",
        freeze_vit: bool = True,
        vit_pretrained: str | None = None,
        vit_kwargs: Mapping[str, Any] | None = None,
        ln_vision_eps: float = 1e-5,
    ) -> None:
        """Build ``visual_encoder`` from ``registry.image_encoders`` and ``ln_vision`` (LayerNorm over its width)."""
        name = VIT_ALIASES.get(vit_model, vit_model)
        encoder_cls = registry.image_encoders.get(name)
        precision = resolve_vit_precision(vit_precision, freeze_vit)
        quantization = precision if precision in VIT_QUANTIZATION else None
        self.visual_encoder = encoder_cls(
            image_size=image_size,
            precision="fp32" if quantization else precision,
            freeze=freeze_vit,
            grad_checkpointing=use_grad_checkpoint,
            drop_path_rate=drop_path_rate,
            pretrained=vit_pretrained,
            **dict(vit_kwargs or {}),
        )
        self.vit_name = name
        self.vit_frozen = bool(freeze_vit)
        width = int(self.visual_encoder.num_features)
        self.ln_vision = nn.LayerNorm(width, eps=ln_vision_eps)
        if self.vit_frozen:
            self.visual_encoder.requires_grad_(False)
            self.visual_encoder.eval()
            logger.info("froze vision encoder %s", name)
        self.vit_quantization = quantization
        if quantization:  # the encoder's weights are here; a checkpoint loaded later is quantised as it loads
            count = quantize_image_encoder(self.visual_encoder, quantization)
            if not count:
                logger.warning("vit_precision=%s: %s has no nn.Linear layer; nothing quantised", quantization, name)

    def init_qformer(
        self,
        num_query_token: int,
        vision_width: int,
        cross_attention_freq: int = 2,
        bert: str | None = None,
        qformer_config: Mapping[str, Any] | None = None,
        vocab_size: int | None = None,
        use_grad_checkpoint: bool = False,
        bert_weights: bool = True,
        qformer: str = "bert_qformer",
    ) -> None:
        """Build ``Qformer``, the ``registry.qformers`` entry named ``qformer`` (from BERT weights when ``bert`` is a
        hub id/dir/``package:`` name, else random), and ``query_tokens``. ``vocab_size`` None: the BERT's vocabulary
        + [DEC], or bert-base-uncased's (30523). ``bert_weights=False``: the BERT gives only the sizes (a full
        checkpoint follows). ``qformer_config`` is checked against that class's ``config_class``."""
        qformer_cls = registry.qformers.get(qformer)
        overrides = dict(qformer_config or {})
        vocab_size = overrides.pop("vocab_size", vocab_size)
        if bert:
            self.Qformer = qformer_cls.from_bert(
                bert,
                encoder_width=vision_width,
                cross_attention_freq=cross_attention_freq,
                num_query_token=num_query_token,
                vocab_size=vocab_size,
                load_weights=bert_weights,
                **overrides,
            )
        else:
            config_class = getattr(qformer_cls, "config_class", QFormerConfig)
            cfg = config_class.from_dict(
                dict(
                    overrides,
                    encoder_width=vision_width,
                    cross_attention_freq=cross_attention_freq,
                    num_query_token=num_query_token,
                    vocab_size=vocab_size or 30523,
                ),
                where=f"model.qformer_config (qformer: {qformer})",
            )
            self.Qformer = qformer_cls(cfg)
        if use_grad_checkpoint:
            self.Qformer.set_gradient_checkpointing(True)
        hidden = self.Qformer.config.hidden_size
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_token, hidden))  # [1, Q, H]
        nn.init.normal_(self.query_tokens, std=self.Qformer.config.initializer_range)

    # -- modes and precision -----------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "Blip2Base":
        """``model.train()`` never puts frozen parts back in training mode."""
        if mode and getattr(self, "qformer_quantization", None):
            raise RuntimeError(f"this model's Q-Former is {self.qformer_quantization} (quantize_for_inference): "
                               "inference only, it cannot train; build the model again to train it")
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def frozen_modules(self) -> list[nn.Module]:
        """Modules kept in eval mode and out of the optimizer; subclasses add their LLM."""
        return [self.visual_encoder] if getattr(self, "vit_frozen", False) else []

    def maybe_autocast(self, dtype: torch.dtype | None = None) -> contextlib.AbstractContextManager:
        """Autocast on CUDA (default fp16); elsewhere only when bf16 is asked (``common.precision``'s rule)."""
        on_cuda = self.device.type == "cuda"
        dtype = compute_dtype(dtype or (torch.float16 if on_cuda else torch.float32), on_cuda, warn=False)
        return autocast(self.device, dtype)

    # -- the shared image path ---------------------------------------------------------------------------------------
    def frozen_image_features(self, images: Tensor) -> Tensor:
        """Raw image-encoder output [B, N, W] (fp32), without grad when the encoder is frozen.

        This is what a frozen-feature cache stores (``ln_vision`` is trainable, so it is applied afterwards).
        """
        encoder = self.visual_encoder
        if images.device.type == "cpu":
            cpu_safe_(encoder, "image encoder")  # the precision rule: fp16 never computes on CPU
        elif getattr(self, "vit_quantization", None):
            raise ValueError(f"model.vit_precision={self.vit_quantization} runs on CPU only (fbgemm); the images are "
                             f"on {images.device}: use fp16, bf16 or fp32 there")
        cache = getattr(self, "feature_cache", None)
        # fbgemm's int8 layers take fp32 inputs: a quantised encoder runs outside a bf16 autocast (run.amp)
        fp32_only = torch.autocast("cpu", enabled=False) if getattr(self, "vit_quantization", None) \
            else contextlib.nullcontext()
        if cache is not None and self.vit_frozen:
            # Frozen-feature cache (run.cache_image_features): the encoder runs only on unseen images.
            with torch.no_grad(), fp32_only:
                return cache.features(images, encoder).float()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.vit_frozen), fp32_only:
            features = encoder(images)  # [B, N, W]
        return features.float()

    def enable_feature_cache(self, root: str, rank: int = 0) -> None:
        """Reuse the frozen encoder's output across epochs from a disk cache under ``root``.

        Valid only with deterministic image preprocessing (see ``models/feature_cache.py``).
        """
        if not self.vit_frozen:
            raise ValueError("cache_image_features needs a frozen image encoder (freeze_vit: true)")
        dtype = str(next(self.visual_encoder.parameters()).dtype)
        fingerprint = encoder_fingerprint(self.visual_encoder, self.visual_encoder.image_size, extra=dtype)
        try:
            self.feature_cache = FrozenFeatureCache(root, fingerprint, rank=rank)
        except FeatureCacheBusy as busy:
            logger.warning("%s. This job runs the image encoder on every batch.", busy)
            self.feature_cache = None

    def encode_image(self, images: Tensor) -> Tensor:
        """images [B,3,S,S] -> image_embeds [B, N, W] = ln_vision(encoder(images)) in fp32."""
        return self.ln_vision(self.frozen_image_features(images))

    def image_embeds_from_samples(self, samples: Mapping[str, Any]) -> Tensor:
        """``ln_vision`` of ``samples["image_embeds"]`` (precomputed frozen features) if present, else of the encoder
        run on ``samples["image"]``. Precomputed features are refused when the encoder is trainable."""
        cached = samples.get("image_embeds") if hasattr(samples, "get") else None
        if cached is not None:
            if not self.vit_frozen:
                raise ValueError("samples['image_embeds'] (cached encoder features) needs freeze_vit=True")
            return self.ln_vision(cached.to(self.ln_vision.weight.device).float())
        if "image" not in samples:
            raise KeyError("samples need 'image' [B,3,S,S] (or precomputed 'image_embeds' [B,N,W])")
        return self.encode_image(samples["image"])

    def query_features(
        self,
        image_embeds: Tensor | None,  # [B, N, W] after ln_vision
        text_ids: Tensor | None = None,  # [B, T] optional text in the same pass (ITM, question-conditioned)
        text_atts: Tensor | None = None,  # [B, T]
        use_cache: bool = False,
        image_key_values: list | None = None,
    ) -> QFormerOutput:
        """Q-Former pass with the learned queries (and optional text, bidirectional mask).

        ``last_hidden_state[:, :Q]`` are the query outputs Z [B, Q, H]; ``past_key_values`` (when ``use_cache``)
        holds the self-attention K/V for ITG and caption decoding; ``image_key_values`` (output) are the
        cross-attention K/V of the image, which a later pass may reuse (input ``image_key_values``, rows selected
        with ``select_image_key_values``) instead of ``image_embeds``.
        """
        if image_embeds is not None:
            batch = image_embeds.shape[0]
        else:
            batch = next(kv for kv in image_key_values if kv is not None)[0].shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)  # [B, Q, H]
        attention_mask = None
        if text_ids is not None and text_atts is not None:
            query_atts = torch.ones(queries.shape[:2], dtype=text_atts.dtype, device=text_atts.device)
            attention_mask = torch.cat([query_atts, text_atts], dim=1)  # [B, Q + T]
        return self.Qformer.bert(
            input_ids=text_ids,
            query_embeds=queries,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            use_cache=use_cache,
            image_key_values=image_key_values,
        )

    @staticmethod
    def select_image_key_values(image_key_values: list, index: Tensor) -> list:
        """Rows ``index`` of per-layer image K/V (None entries stay None); gradients flow back to the source."""
        return [None if kv is None else (kv[0][index], kv[1][index]) for kv in image_key_values]

    # -- optimisation and checkpoints --------------------------------------------------------------------------------
    def num_vision_layers(self) -> int:
        encoder = getattr(self, "visual_encoder", None)
        if encoder is None:
            return 0
        if hasattr(encoder, "num_layers"):
            return int(encoder.num_layers)
        ids = {block_index(n) for n, _ in encoder.named_parameters()}
        ids.discard(None)
        return len(ids)

    def vision_layer_id(self, name: str) -> int | None:
        if not name.startswith("visual_encoder."):
            return None
        inner = name[len("visual_encoder."):]
        if hasattr(self.visual_encoder, "layer_id"):
            return int(self.visual_encoder.layer_id(inner))
        index = block_index(inner)
        if index is not None:
            return index + 1
        first = inner.split(".")[0]
        if first in ("cls_token", "pos_embed", "patch_embed", "embeddings", "conv1", "class_embedding",
                     "positional_embedding", "ln_pre", "norm_pre"):
            return 0
        return self.num_vision_layers() + 1

    def _missing_key_is_expected(self, key: str) -> bool:
        # The position-id buffer is absent from Hugging Face checkpoints; it is a constant.
        return key == "Qformer.bert.embeddings.position_ids" or super()._missing_key_is_expected(key)

    @staticmethod
    def vision_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The ``init_vision_encoder`` arguments a model config sets (its defaults apply to the others)."""
        return config_kwargs(cfg, parameter_names(Blip2Base.init_vision_encoder))

    # -- weight sources ----------------------------------------------------------------------------------------------
    @staticmethod
    def weight_plan(cfg: Mapping[str, Any]) -> dict[str, Any]:
        """Decide where weights come from, so nothing is downloaded that a full checkpoint then overwrites.

        ``weights``: ``hf`` (default when ``hf_hub_id`` is set: one Hugging Face checkpoint holding the ViT and the
        Q-Former), ``lavis`` (the original ``finetuned``/``pretrained`` .pth, chosen by ``load_finetuned`` /
        ``load_pretrained``, plus the separate ViT file ``vit_pretrained``), or ``none``. Whenever no full checkpoint
        is loaded, the ViT comes from ``vit_pretrained`` and the Q-Former from the BERT ``bert`` (random where null).
        Returns ``{"source", "checkpoints": [...], "vit_pretrained", "bert", "bert_shape"}``; ``bert_shape``: a local
        BERT checkpoint whose config gives the Q-Former's sizes when a full checkpoint brings the weights.
        """
        source = cfg.get("weights") or ("hf" if cfg.get("hf_hub_id") else "lavis")
        shape = _local_bert(cfg.get("bert"))
        load_pretrained = bool(cfg.get("load_pretrained", True))
        load_finetuned = bool(cfg.get("load_finetuned", False))
        checkpoints: list[str] = []
        if source == "hf":
            if (load_pretrained or load_finetuned) and not cfg.get("hf_hub_id"):
                raise ValueError("model.weights=hf needs model.hf_hub_id (a hub id or a local directory), "
                                 "or load_pretrained: false")
            if load_pretrained or load_finetuned:
                return {"source": source, "checkpoints": [cfg.get("hf_hub_id")], "vit_pretrained": None, "bert": None,
                        "bert_shape": shape}
        elif source == "lavis":
            if load_finetuned and cfg.get("finetuned"):
                checkpoints = [cfg.get("finetuned")]
                if not cfg.get("freeze_vit", True):  # a fine-tuned trainable ViT is inside the checkpoint
                    return {"source": source, "checkpoints": checkpoints, "vit_pretrained": None, "bert": None,
                            "bert_shape": shape}
            elif load_pretrained and cfg.get("pretrained"):
                checkpoints = [cfg.get("pretrained")]
        elif source != "none":
            raise ValueError(f"model.weights must be one of hf, lavis, none; got {source!r}")
        return {
            "source": source,
            "checkpoints": checkpoints,
            "vit_pretrained": cfg.get("vit_pretrained"),  # LAVIS checkpoints never hold the frozen ViT
            "bert": None if checkpoints else cfg.get("bert"),
            "bert_shape": shape if checkpoints else None,
        }
