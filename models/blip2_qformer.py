"""Stage 1 of BLIP-2 (paper, section 3.2): the Q-Former trained on a frozen image encoder with ITC, ITM and ITG.

Registered as ``blip2`` and ``blip2_feature_extractor`` (one class, as in LAVIS) and ``blip2_image_text_matching``.
One step runs the image encoder once; the query pass (with its KV cache) serves ITC, the ITM negatives and ITG.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

import registry
from models import dist
from models.base_model import config_kwargs
from models.blip2_base import Blip2Base
from models.qformer_decoding import beam_search, sample

ZOO = {
    "pretrain": "configs/blip2_pretrain.yaml",
    "pretrain_vitL": "configs/blip2_pretrain_vitL.yaml",
    "coco": "configs/blip2_coco.yaml",
    "tiny": "configs/blip2_tiny.yaml",
}


@dataclass
class Blip2Features:
    """``extract_features`` output (LAVIS ``BlipOutputFeatures``); fields not asked for stay None."""

    image_embeds: Tensor | None = None  # [B, Q, H] query outputs
    image_embeds_proj: Tensor | None = None  # [B, Q, E] L2-normalised
    text_embeds: Tensor | None = None  # [B, T, H]
    text_embeds_proj: Tensor | None = None  # [B, T, E] L2-normalised (CLS = [:, 0])
    multimodal_embeds: Tensor | None = None  # [B, Q, H] query outputs of the image+text pass


class Blip2InferenceMixin:
    """Feature extraction, ITM scoring, retrieval features and captioning (a mixin of ``Blip2Qformer``)."""

    @torch.no_grad()
    def extract_features(self, samples: Mapping[str, Any], mode: str = "multimodal") -> Blip2Features:
        """``mode``: ``image`` (query outputs + projections), ``text`` (text pass + projections) or ``multimodal``
        (query outputs of the joint image+text pass, bidirectional mask)."""
        if mode not in ("image", "text", "multimodal"):
            raise ValueError(f"extract_features: mode must be 'image', 'text' or 'multimodal', got {mode!r}")
        features = Blip2Features()
        num_query = self.query_tokens.shape[1]
        if mode in ("image", "multimodal"):
            image_embeds = self.image_embeds_from_samples(samples)
        if mode in ("text", "multimodal"):
            text_ids, text_atts = self.tokenize(samples["text_input"])
        if mode == "image":
            query = self.query_features(image_embeds).last_hidden_state  # [B, Q, H]
            features.image_embeds = query
            features.image_embeds_proj = F.normalize(self.vision_proj(query), dim=-1)
        elif mode == "text":
            hidden = self.Qformer.bert(input_ids=text_ids, attention_mask=text_atts).last_hidden_state
            features.text_embeds = hidden
            features.text_embeds_proj = F.normalize(self.text_proj(hidden), dim=-1)
        else:
            out = self.query_features(image_embeds, text_ids, text_atts).last_hidden_state
            features.multimodal_embeds = out[:, :num_query]
        return features

    def compute_itm(self, image_inputs: Tensor, text_ids: Tensor, text_atts: Tensor) -> Tensor:
        """ITM logit of "match" [B], averaged over queries; ``image_inputs`` are image embeds [B, N, W]."""
        num_query = self.query_tokens.shape[1]
        out = self.query_features(image_inputs, text_ids, text_atts).last_hidden_state[:, :num_query]
        return self.itm_head(out)[:, :, 1].mean(dim=1)

    # -- retrieval (tasks/retrieval.py owns the top-k loop) -------------------------------------------------------------
    @torch.no_grad()
    def image_retrieval_features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(image_feats [B, Q, E] L2-normalised, image_embeds [B, N, W] after ln_vision)."""
        image_embeds = self.encode_image(images)
        query = self.query_features(image_embeds).last_hidden_state
        return F.normalize(self.vision_proj(query), dim=-1), image_embeds

    @torch.no_grad()
    def text_retrieval_features(self, texts: list[str], max_length: int = 35) -> tuple[Tensor, Tensor, Tensor]:
        """(text_feat [B, E] L2-normalised, text_ids [B, T], text_atts [B, T]); LAVIS uses max_length 35 here."""
        text_ids, text_atts = self.tokenize(texts, max_length=max_length)
        return self.text_features(text_ids, text_atts), text_ids, text_atts

    @torch.no_grad()
    def itm_scores(
        self, image_embeds: Tensor, text_ids: Tensor, text_atts: Tensor, image_index: Tensor | None = None
    ) -> Tensor:
        """ITM "match" logit [B] (mean over queries) for aligned rows of image embeds and texts.

        With ``image_index`` [B], ``image_embeds`` [M, N, W] holds distinct images and row b uses image
        ``image_index[b]``: each image's cross-attention K/V is projected once, however many texts it meets.
        """
        keep = int(text_atts.sum(1).max().item())  # drop all-padding columns
        text_ids, text_atts = text_ids[:, :keep], text_atts[:, :keep]
        if image_index is None:
            return self.compute_itm(image_embeds, text_ids, text_atts)
        image_kv = self.select_image_key_values(self.Qformer.bert.image_key_values(image_embeds), image_index)
        num_query = self.query_tokens.shape[1]
        out = self.query_features(None, text_ids, text_atts, image_key_values=image_kv).last_hidden_state
        return self.itm_head(out[:, :num_query])[:, :, 1].mean(dim=1)

    # -- captioning from the Q-Former decoder --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        samples: Mapping[str, Any],
        use_nucleus_sampling: bool = False,
        num_beams: int = 3,
        max_length: int = 30,
        min_length: int = 10,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        num_captions: int = 1,
        temperature: float = 1.0,
    ) -> list[str]:
        """Captions [B * num_captions] decoded incrementally on the query KV cache (the image is encoded once).

        ``max_length``/``min_length`` count tokens including the [DEC] bos (Hugging Face semantics, as in LAVIS).
        """
        image_embeds = self.image_embeds_from_samples(samples)
        cache = self.query_features(image_embeds, use_cache=True).past_key_values
        tok = self.tokenizer

        def step(last: Tensor, past):
            atts = torch.ones(last.shape[0], past.length + 1, dtype=torch.long, device=last.device)
            out = self.Qformer(last, attention_mask=atts, past_key_values=past, use_cache=True)
            return out.logits[:, -1], out.past_key_values

        common = dict(bos_id=tok.bos_token_id, eos_id=tok.sep_token_id, pad_id=tok.pad_token_id,
                      max_length=max_length, min_length=min_length, repetition_penalty=repetition_penalty)
        if use_nucleus_sampling or num_beams == 1:
            ids = sample(step, cache.repeat_interleave(num_captions), top_p=top_p, temperature=temperature,
                         greedy=not use_nucleus_sampling, **common)
        else:
            ids = beam_search(step, cache, num_beams=num_beams, length_penalty=length_penalty,
                              num_return_sequences=num_captions, **common)
        return [text.strip() for text in tok.batch_decode(ids, skip_special_tokens=True)]


ITM_NEGATIVES = ("multinomial", "hardest")  # sampled from the ITC similarities (paper) | the most similar one


@registry.models.register("blip2", "blip2_feature_extractor")
class Blip2Qformer(Blip2InferenceMixin, Blip2Base):
    """BLIP-2 stage 1: ``forward`` returns loss, loss_itc, loss_itm, loss_itg."""

    PRETRAINED_MODEL_CONFIG_DICT = ZOO
    DEFAULT_MODEL_TYPE = "pretrain"
    CONSTRUCTOR_ONLY = ("bert_weights",)  # from_config decides it from the weight plan
    LOSSES = ("itc", "itm", "itg")
    CONFIG_CHOICES = {"itm_negatives": ITM_NEGATIVES}  # checked by config validation and by __init__

    def __init__(
        self,
        vit_model: str = "eva_clip_g",
        image_size: int = 224,
        drop_path_rate: float = 0.0,
        use_grad_checkpoint: bool = False,
        vit_precision: str = "fp16",
        freeze_vit: bool = True,
        num_query_token: int = 32,
        cross_attention_freq: int = 2,
        embed_dim: int = 256,
        max_txt_len: int = 32,
        *,
        vit_pretrained: str | None = None,
        vit_kwargs: Mapping[str, Any] | None = None,
        ln_vision_eps: float = 1e-5,
        bert: str | None = None,
        qformer_config: Mapping[str, Any] | None = None,
        tokenizer: str | None = None,
        qformer: str = "bert_qformer",
        itm_negatives: str = "multinomial",
        itm_seed: int = 0,
        label_smoothing: float = 0.1,
        bert_weights: bool = True,
        loss_weights: Mapping[str, float] | None = None,
        itc_gather_grad: bool = False,
    ) -> None:
        """``loss_weights``: weight of each stage-1 objective in ``loss`` (``{itc: 1, itm: 1, itg: 1}``; a missing key
        is 1, a weight of 0 switches that objective off and it is not computed, e.g. the paper's Table 6 ablation
        without ITG). ``itc_gather_grad``: False (the released code, whose ``concat_all_gather`` carries no
        gradient) lets each ITC similarity row back-propagate through its own feature only, the batch's other
        features (the gathered side) being constants; True also back-propagates through the gathered side."""
        super().__init__()
        if itm_negatives not in ITM_NEGATIVES:
            raise ValueError(f"model.itm_negatives must be one of {ITM_NEGATIVES}, got {itm_negatives!r}")
        self.loss_weights = self._check_loss_weights(loss_weights)
        if not isinstance(itc_gather_grad, bool):
            raise ValueError(f"model.itc_gather_grad must be true or false, got {itc_gather_grad!r}")
        self.itc_gather_grad = itc_gather_grad
        self.tokenizer = self.init_tokenizer(tokenizer, bert=bert)
        self.init_vision_encoder(vit_model, image_size, drop_path_rate, use_grad_checkpoint, vit_precision,
                                 freeze_vit, vit_pretrained, vit_kwargs, ln_vision_eps)
        self.init_qformer(num_query_token, self.visual_encoder.num_features, cross_attention_freq, bert=bert,
                          qformer_config=qformer_config, vocab_size=len(self.tokenizer), bert_weights=bert_weights,
                          use_grad_checkpoint=use_grad_checkpoint, qformer=qformer)
        hidden = self.Qformer.config.hidden_size
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(0.07 * torch.ones([]))
        self.max_txt_len = max_txt_len
        self.itm_negatives = itm_negatives
        self.itm_seed = itm_seed
        self.label_smoothing = label_smoothing
        self._step = 0  # used to seed ITM negatives when samples carry no "iters"

    @classmethod
    def from_config(cls, cfg: DictConfig | Mapping[str, Any]) -> "Blip2Qformer":
        """Build from a zoo/project ``model:`` node (LAVIS keys) and load the weights it names. Keys the config
        leaves out take the constructor's defaults."""
        plan = cls.weight_plan(cfg)
        kwargs = config_kwargs(cfg, cls.config_parameters())
        kwargs.update(vit_pretrained=plan["vit_pretrained"], bert=plan["bert"] or plan["bert_shape"],
                      bert_weights=bool(plan["bert"]))
        if kwargs.get("qformer") is None:
            kwargs.pop("qformer", None)
        model = cls(**kwargs)
        for checkpoint in plan["checkpoints"]:
            model.load_checkpoint(checkpoint)
        return model

    @classmethod
    def _check_loss_weights(cls, weights: Mapping[str, float] | None) -> dict[str, float]:
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(cls.LOSSES))
        if unknown:
            raise ValueError(f"model.loss_weights: unknown objective(s) {unknown}; valid: {list(cls.LOSSES)}")
        out = {}
        for name in cls.LOSSES:
            value = weights.get(name, 1.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"model.loss_weights.{name} must be a number >= 0, got {value!r}")
            out[name] = float(value)
        if not any(out.values()):
            raise ValueError(f"model.loss_weights: at least one of {list(cls.LOSSES)} needs a weight > 0, got {out}")
        return out

    def _missing_key_is_expected(self, key: str) -> bool:
        # Hugging Face retrieval checkpoints have no temperature and no Q-Former LM head.
        return key == "temp" or key.startswith("Qformer.cls.") or super()._missing_key_is_expected(key)

    # -- text --------------------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str], max_length: int | None = None):
        """Right-padded to the longest text in the batch (never to max_length), truncated at ``max_length``."""
        if isinstance(texts, str):
            texts = [texts]
        tokens = self.tokenizer(list(texts), padding="longest", truncation=True,
                                max_length=max_length or self.max_txt_len, return_tensors="pt")
        return tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)

    def text_features(self, text_ids: Tensor, text_atts: Tensor) -> Tensor:
        """Unimodal text pass (ITC mask: no queries, no image) -> L2-normalised CLS projection [B, E]."""
        hidden = self.Qformer.bert(input_ids=text_ids, attention_mask=text_atts).last_hidden_state
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    # -- training ----------------------------------------------------------------------------------------------------
    def forward(self, samples: Mapping[str, Any]) -> dict[str, Tensor]:
        """``{"loss", "loss_itc", "loss_itm", "loss_itg"}``: ``loss`` is the ``loss_weights``-weighted sum; an
        objective with weight 0 is not computed and its ``loss_<name>`` is absent."""
        weights = self.loss_weights
        image_embeds = self.image_embeds_from_samples(samples)  # [B, N, W]
        batch = image_embeds.shape[0]
        query_out = self.query_features(image_embeds, use_cache=weights["itg"] > 0)
        text_ids, text_atts = self.tokenize(samples["text_input"])
        text_ids, text_atts = _pad_to_global_length(text_ids, text_atts, self.tokenizer.pad_token_id)
        rank = dist.get_rank()
        losses: dict[str, Tensor] = {}

        if weights["itc"] > 0 or weights["itm"] > 0:  # ITM picks its negatives from the ITC similarities
            image_feats = F.normalize(self.vision_proj(query_out.last_hidden_state), dim=-1)  # [B, Q, E]
            text_feat = self.text_features(text_ids, text_atts)  # [B, E]
            sim_i2t, sim_t2i, positives = self._itc_similarities(image_feats, text_feat, samples, rank, batch)
            if weights["itc"] > 0:
                targets = positives.float() / positives.sum(1, keepdim=True)  # soft targets for duplicates
                losses["itc"] = (
                    F.cross_entropy(sim_i2t, targets, label_smoothing=self.label_smoothing)
                    + F.cross_entropy(sim_t2i, targets, label_smoothing=self.label_smoothing)
                ) / 2
            if weights["itm"] > 0:
                losses["itm"] = self._itm_loss(
                    image_embeds, query_out, text_ids, text_atts, sim_i2t, sim_t2i, positives, samples, rank, batch
                )
        if weights["itg"] > 0:
            losses["itg"] = self._itg_loss(query_out, text_ids, text_atts, batch)
        self._step += 1
        total = sum(weights[name] * value for name, value in losses.items())
        return {"loss": total, **{f"loss_{name}": value for name, value in losses.items()}}

    def _itc_similarities(self, image_feats: Tensor, text_feat: Tensor, samples, rank: int, batch: int):
        """(sim_i2t [B, G], sim_t2i [B, G], positives [B, G]): max over queries, divided by the temperature, against
        the features of every rank (G = world x B). The gathered side is a constant unless ``itc_gather_grad``."""
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        if self.itc_gather_grad:
            image_feats_all = dist.all_gather_with_grad(image_feats)  # [G, Q, E]
            text_feat_all = dist.all_gather_with_grad(text_feat)  # [G, E]
        else:  # LAVIS concat_all_gather: no gradient through the gathered copies, local ones included
            image_feats_all = dist.all_gather(image_feats).detach()
            text_feat_all = dist.all_gather(text_feat).detach()
        sim_i2t = torch.einsum("bqe,ge->bgq", image_feats, text_feat_all).amax(-1) / self.temp  # [B, G]
        sim_t2i = torch.einsum("be,gqe->bgq", text_feat, image_feats_all).amax(-1) / self.temp  # [B, G]
        image_ids = samples.get("image_id")
        if image_ids is not None:
            image_ids = torch.as_tensor(image_ids, device=image_feats.device).view(-1, 1)  # [B, 1]
            positives = image_ids == dist.all_gather(image_ids).view(1, -1)  # [B, G] same image = positive
        else:
            positives = torch.zeros_like(sim_i2t, dtype=torch.bool)
            positives[:, rank * batch : (rank + 1) * batch].fill_diagonal_(True)
        return sim_i2t, sim_t2i, positives

    def _itm_loss(self, image_embeds, query_out, text_ids, text_atts, sim_i2t, sim_t2i, positives, samples,
                  rank: int, batch: int) -> Tensor:
        """ITM: the positive pair, one hard negative text per image and one hard negative image per text."""
        neg_image_idx, neg_text_idx = self._itm_negatives(sim_i2t, sim_t2i, positives, samples, rank, batch)
        text_ids_all, text_atts_all = dist.all_gather(text_ids), dist.all_gather(text_atts)
        itm_text_ids = torch.cat([text_ids, text_ids, text_ids_all[neg_text_idx]])  # [3B, T]
        itm_text_atts = torch.cat([text_atts, text_atts, text_atts_all[neg_text_idx]])
        if dist.get_world_size() == 1:
            # Every ITM image is in this batch: reuse the query pass's image K/V instead of projecting 3B images.
            rows = torch.arange(batch, device=neg_image_idx.device)
            image_kv = self.select_image_key_values(query_out.image_key_values, torch.cat([rows, neg_image_idx, rows]))
            itm_out = self.query_features(None, itm_text_ids, itm_text_atts, image_key_values=image_kv)
        else:
            image_embeds_all = dist.all_gather_with_grad(image_embeds)  # [G, N, W]
            itm_images = torch.cat([image_embeds, image_embeds_all[neg_image_idx], image_embeds])  # [3B, N, W]
            itm_out = self.query_features(itm_images, itm_text_ids, itm_text_atts)
        num_query = self.query_tokens.shape[1]
        itm_logits = self.itm_head(itm_out.last_hidden_state[:, :num_query]).mean(1)  # [3B, 2]
        itm_labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(itm_logits.device)
        return F.cross_entropy(itm_logits.float(), itm_labels)

    def _itg_loss(self, query_out, text_ids: Tensor, text_atts: Tensor, batch: int) -> Tensor:
        """ITG: [DEC] first, multimodal causal mask, queries from the KV cache of the query pass."""
        decoder_ids = text_ids.clone()
        decoder_ids[:, 0] = self.tokenizer.bos_token_id
        labels = decoder_ids.masked_fill(decoder_ids == self.tokenizer.pad_token_id, -100)
        num_query = self.query_tokens.shape[1]
        query_atts = torch.ones(batch, num_query, dtype=text_atts.dtype, device=text_atts.device)
        lm_out = self.Qformer(
            decoder_ids,
            attention_mask=torch.cat([query_atts, text_atts], dim=1),
            past_key_values=query_out.past_key_values,
            labels=labels,
            label_smoothing=self.label_smoothing,
            reduction="sum",
            return_logits=False,  # vocabulary projection on target tokens only
        )
        return lm_out.loss / _mean_tokens_per_rank(labels[:, 1:] != -100)

    @torch.no_grad()
    def _itm_negatives(self, sim_i2t, sim_t2i, positives, samples, rank: int, batch: int) -> tuple[Tensor, Tensor]:
        """Indices (into the gathered batch) of a negative image per text and a negative text per image.

        ``multinomial`` samples from softmax(ITC similarity) with positives excluded, using one generator per
        GLOBAL sample index seeded from (itm_seed, step, index): the choice does not depend on how the global batch
        is split across ranks. ``hardest`` takes the most similar negative (deterministic).
        """
        weights_t2i = sim_t2i.float().masked_fill(positives, -10000).softmax(1)  # [B, G]
        weights_i2t = sim_i2t.float().masked_fill(positives, -10000).softmax(1)
        if self.itm_negatives == "hardest":
            return weights_t2i.argmax(1), weights_i2t.argmax(1)
        step = int(samples.get("iters", self._step)) if hasattr(samples, "get") else self._step
        cdf_t2i, cdf_i2t = weights_t2i.cumsum(1).cpu(), weights_i2t.cumsum(1).cpu()
        neg_image, neg_text = [], []
        for b in range(batch):
            gen = torch.Generator().manual_seed(_mix_seed(self.itm_seed, step, rank * batch + b))
            u = torch.rand(2, generator=gen, dtype=torch.float64)
            neg_image.append(_inverse_cdf(cdf_t2i[b], u[0].item()))
            neg_text.append(_inverse_cdf(cdf_i2t[b], u[1].item()))
        device = sim_t2i.device
        return torch.tensor(neg_image, device=device), torch.tensor(neg_text, device=device)


def _mix_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed from (seed, step, global sample index) (splitmix64-style mixing)."""
    value = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    value ^= value >> 31
    value = (value * 0xD6E8FEB86659FD93) & (2**64 - 1)
    return value & (2**63 - 1)


def _inverse_cdf(cdf: Tensor, u: float) -> int:
    index = int(torch.searchsorted(cdf, torch.tensor([u * cdf[-1].item()], dtype=cdf.dtype)).item())
    return min(index, cdf.shape[0] - 1)


def _mean_tokens_per_rank(target_mask: Tensor) -> Tensor:
    """Token count that makes the per-rank ITG sums, averaged by DDP, equal the global token mean.

    One process: the local count (a plain mean). Distributed: global count / world size.
    """
    return dist.mean_tokens_per_rank(target_mask.sum())


def _pad_to_global_length(ids: Tensor, atts: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """Distributed only: right-pad to the longest text on any rank (all_gather needs equal shapes)."""
    if dist.get_world_size() == 1:
        return ids, atts
    length = torch.tensor([ids.shape[1]], device=ids.device)
    torch.distributed.all_reduce(length, op=torch.distributed.ReduceOp.MAX)
    extra = int(length.item()) - ids.shape[1]
    if extra > 0:
        ids = F.pad(ids, (0, extra), value=pad_id)
        atts = F.pad(atts, (0, extra), value=0)
    return ids, atts


@registry.models.register("blip2_image_text_matching")
class Blip2ITM(Blip2Qformer):
    """Image-text matching scores: ``forward(samples, match_head="itm" | "itc")``."""

    def forward(self, samples: Mapping[str, Any], match_head: str = "itm") -> Tensor:
        """``itm``: logits [B, 2] (mean over queries; softmax(dim=1)[:, 1] is the match probability).
        ``itc``: cosine similarity [B, 1], max over queries (not divided by the temperature)."""
        image_embeds = self.image_embeds_from_samples(samples)
        text_ids, text_atts = self.tokenize(samples["text_input"])
        if match_head == "itm":
            num_query = self.query_tokens.shape[1]
            out = self.query_features(image_embeds, text_ids, text_atts).last_hidden_state[:, :num_query]
            return self.itm_head(out).mean(dim=1)
        if match_head == "itc":
            image_feats = F.normalize(self.vision_proj(self.query_features(image_embeds).last_hidden_state), dim=-1)
            text_feat = self.text_features(text_ids, text_atts)  # [B, E]
            return torch.bmm(image_feats, text_feat.unsqueeze(-1)).amax(dim=1)  # [B, 1]
        raise ValueError(f"match_head must be 'itm' or 'itc', got {match_head!r}")
