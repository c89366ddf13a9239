"""The Q-Former's layers: a BERT whose layers also carry learnable queries, image cross-attention and a query FFN.

Layout (paper, section 3.1): self-attention shared by [queries; text]; cross-attention to the frozen image
features every ``cross_attention_freq`` layers (layers 0, 2, ...), applied to the query slice only; separate FFNs
for query positions (``intermediate_query``/``output_query``) and text positions (``intermediate``/``output``).
Module names follow LAVIS (``bert.encoder.layer.N.attention.self.query``, ``crossattention.self.key``,
``cls.predictions.*``), so LAVIS state dicts load as they are; Hugging Face names are mapped in
``models/checkpoints/``. The registered ``QFormer`` (body + LM head) is in ``models/qformer.py``.

Masks (paper, Figure 2): ``causal=False`` is bidirectional (ITM, features); ``causal=True`` is the multimodal causal
mask of ITG (text sees all queries and earlier text, queries never see text); ITC's unimodal mask is two separate
passes (queries-only and text-only). The self-attention K/V of a pass can be kept in a ``QFormerCache`` so that ITG
and caption decoding reuse the query pass instead of recomputing it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.lean_attention import LeanDropout, attention
from models.qformer_config import QFormerCache, QFormerConfig, QFormerOutput


_ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"qformer config: hidden_act '{name}' is not supported; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


class QFormerEmbeddings(nn.Module):
    """Word + absolute position embeddings for text; queries (no position embedding) go first; LayerNorm over both."""

    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = LeanDropout(cfg.hidden_dropout_prob)
        # Persistent, as in LAVIS checkpoints (HF BLIP-2 lists it as unexpected; the loader drops it there).
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings).unsqueeze(0), persistent=True)

    def forward(self, input_ids: Tensor | None, query_embeds: Tensor | None, past_text_length: int = 0) -> Tensor:
        parts = []
        if query_embeds is not None:
            parts.append(query_embeds)  # [B, Q, H]
        if input_ids is not None:
            if self.word_embeddings is None:
                raise RuntimeError("this Q-Former had its text embeddings removed (stage-2 query path); it takes no text")
            length = input_ids.shape[1]
            positions = self.position_ids[:, past_text_length : past_text_length + length]
            text = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # [B, T, H]
            parts.append(text.to(parts[0].dtype) if parts else text)
        if not parts:
            raise ValueError("Q-Former embeddings need input_ids, query_embeds or both")
        hidden = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.dropout(self.LayerNorm(hidden))


class QFormerSelfAttention(nn.Module):
    """Multi-head attention projections; K/V read from ``kv_width`` features (hidden or image width)."""

    def __init__(self, cfg: QFormerConfig, kv_width: int) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def _heads(self, x: Tensor) -> Tensor:  # [B, L, H] -> [B, heads, L, head_dim]
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self,
        hidden: Tensor,
        kv_states: Tensor | None,
        mask: Tensor | None,
        past: tuple[Tensor, Tensor] | None = None,
        kv: tuple[Tensor, Tensor] | None = None,  # precomputed K/V of kv_states (e.g. image K/V reused for ITM)
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        q = self._heads(self.query(hidden))  # [B, h, L, d]
        if kv is not None:
            k, v = kv
        else:
            k, v = self._heads(self.key(kv_states)), self._heads(self.value(kv_states))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = attention(q, k, v, mask, self.dropout_p if self.training else 0.0)  # [B, h, L, d]
        return out.transpose(1, 2).flatten(2), (k, v)


class QFormerSelfOutput(nn.Module):
    """Output projection + residual + LayerNorm (BERT's ``*.output``)."""

    def __init__(self, cfg: QFormerConfig, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = LeanDropout(cfg.hidden_dropout_prob)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class QFormerAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int) -> None:
        super().__init__()
        self.self = QFormerSelfAttention(cfg, kv_width)
        self.output = QFormerSelfOutput(cfg, cfg.hidden_size)

    def forward(self, hidden, kv_states, mask, past=None, kv=None):
        context, present = self.self(hidden, kv_states, mask, past, kv)
        return self.output(context, hidden), present


class QFormerIntermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.intermediate_act_fn = _activation(cfg.hidden_act)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.intermediate_act_fn(self.dense(hidden))


class QFormerLayer(nn.Module):
    """Self-attention over [queries; text] -> cross-attention (query slice, some layers) -> query/text FFNs."""

    def __init__(self, cfg: QFormerConfig, layer_index: int) -> None:
        super().__init__()
        self.attention = QFormerAttention(cfg, cfg.hidden_size)
        self.has_cross_attention = layer_index % cfg.cross_attention_freq == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(cfg, cfg.encoder_width)
        self.intermediate = QFormerIntermediate(cfg)
        self.output = QFormerSelfOutput(cfg, cfg.intermediate_size)
        self.intermediate_query = QFormerIntermediate(cfg)
        self.output_query = QFormerSelfOutput(cfg, cfg.intermediate_size)

    def forward(
        self,
        hidden: Tensor,  # [B, Q + T, H] (Q new query positions first)
        num_query: int,
        self_mask: Tensor | None,  # bool [B|1, 1, Q + T, K] or None (attend everywhere)
        image: Tensor | None,  # [B, N, W]
        image_mask: Tensor | None,  # bool [B, 1, 1, N] or None
        past: tuple[Tensor, Tensor] | None,
        image_kv: tuple[Tensor, Tensor] | None = None,  # this layer's precomputed image K/V [B, h, N, d]
    ) -> tuple[Tensor, tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
        """Returns (hidden, self-attention K/V incl. past, image K/V of the cross-attention or None)."""
        hidden, present = self.attention(hidden, hidden, self_mask, past)
        outputs = []
        cross_kv = None
        if num_query > 0:
            queries = hidden[:, :num_query]
            if self.has_cross_attention:
                if image is None and image_kv is None:
                    raise ValueError("queries need image features (encoder_hidden_states) for cross-attention")
                image = image.to(queries.dtype) if image is not None else None
                queries, cross_kv = self.crossattention(queries, image, image_mask, kv=image_kv)
            outputs.append(self.output_query(self.intermediate_query(queries), queries))
        if hidden.shape[1] > num_query:
            if self.intermediate is None:
                raise RuntimeError("this Q-Former had its text FFN removed (stage-2 query path); it takes no text")
            text = hidden[:, num_query:]
            outputs.append(self.output(self.intermediate(text), text))
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)), present, cross_kv


def self_attention_mask(
    padding_mask: Tensor | None,  # [B, K] 1 = real token, over past + current keys; None = all real
    num_query: int,  # query positions in this pass (first)
    num_text: int,  # text positions in this pass
    past: QFormerCache | None,
    causal: bool,
    device: torch.device,
) -> Tensor | None:
    """Boolean self-attention mask [B|1, 1, Q+T, K] (True = may attend), or None when everything may attend.

    causal=False: bidirectional (padding only). causal=True: queries see only queries; text sees every query and the
    text up to itself (UniLM-style multimodal causal mask of ITG).
    """
    past_len = past.length if past is not None else 0
    past_query = past.num_query if past is not None else 0
    if num_query and past_len:
        raise ValueError("new query positions cannot follow cached positions; queries always come first")
    total = past_len + num_query + num_text
    if padding_mask is not None and padding_mask.shape[1] != total:
        raise ValueError(f"attention_mask covers {padding_mask.shape[1]} keys, expected {total} (past + queries + text)")
    allowed = None
    if causal:
        n_query_keys = past_query + num_query
        key_idx = torch.arange(total, device=device)
        key_is_query = key_idx < n_query_keys
        key_text_idx = key_idx - n_query_keys  # negative for queries
        row_text_idx = torch.cat([
            torch.full((num_query,), -1, device=device, dtype=torch.long),
            torch.arange(num_text, device=device) + (past_len - past_query),
        ])  # [Q+T], -1 for query rows
        row_is_query = torch.arange(num_query + num_text, device=device) < num_query
        text_ok = (key_text_idx[None, :] <= row_text_idx[:, None]) & ~row_is_query[:, None]
        allowed = (key_is_query[None, :] | text_ok)[None, None]  # [1, 1, Q+T, K]
    if padding_mask is not None and not bool(padding_mask.all()):
        pad = padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # [B, 1, 1, K]
        allowed = pad if allowed is None else allowed & pad
    if allowed is None:
        return None
    # A row that may attend nowhere would give NaN; let it attend everywhere (its output is never used).
    return allowed | ~allowed.any(dim=-1, keepdim=True)


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.gradient_checkpointing = cfg.gradient_checkpointing

    def forward(self, hidden, num_query, self_mask, image, image_mask, past: QFormerCache | None, use_cache: bool,
                image_kv: list | None = None):
        """Returns (hidden, self-attention K/V per layer if use_cache, image K/V per layer (None where no
        cross-attention))."""
        presents, cross_kvs = [], []
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layer):
            layer_past = past.layers[i] if past is not None else None
            layer_kv = image_kv[i] if image_kv is not None else None
            if use_ckpt:
                hidden, present, cross_kv = checkpoint(
                    layer, hidden, num_query, self_mask, image, image_mask, layer_past, layer_kv, use_reentrant=False
                )
            else:
                hidden, present, cross_kv = layer(hidden, num_query, self_mask, image, image_mask, layer_past, layer_kv)
            if use_cache:
                presents.append(present)
            cross_kvs.append(cross_kv)
        return hidden, presents, cross_kvs


class QFormerModel(nn.Module):
    """The BERT body (``Qformer.bert`` in LAVIS): embeddings + encoder, no pooler."""

    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = QFormerEmbeddings(cfg)
        self.encoder = QFormerEncoder(cfg)

    def forward(
        self,
        input_ids: Tensor | None = None,  # [B, T]
        query_embeds: Tensor | None = None,  # [B, Q, H]
        attention_mask: Tensor | None = None,  # [B, past + Q + T]
        encoder_hidden_states: Tensor | None = None,  # [B, N, W] image features
        encoder_attention_mask: Tensor | None = None,  # [B, N]
        past_key_values: QFormerCache | None = None,
        use_cache: bool = False,
        causal: bool = False,
        image_key_values: list | None = None,
    ) -> QFormerOutput:
        """``image_key_values``: the ``image_key_values`` of an earlier pass (rows indexed as needed), used instead of
        projecting ``encoder_hidden_states`` again (the ITM pass reuses the query pass's image K/V this way)."""
        num_query = query_embeds.shape[1] if query_embeds is not None else 0
        num_text = input_ids.shape[1] if input_ids is not None else 0
        past_text = past_key_values.text_length if past_key_values is not None else 0
        hidden = self.embeddings(input_ids, query_embeds, past_text_length=past_text)
        self_mask = self_attention_mask(attention_mask, num_query, num_text, past_key_values, causal, hidden.device)
        image_mask = None
        if encoder_attention_mask is not None and not bool(encoder_attention_mask.all()):
            image_mask = encoder_attention_mask.to(torch.bool)[:, None, None, :]
        hidden, presents, cross_kvs = self.encoder(
            hidden, num_query, self_mask, encoder_hidden_states, image_mask, past_key_values, use_cache,
            image_key_values,
        )
        cache = None
        if use_cache:
            prior_query = past_key_values.num_query if past_key_values is not None else 0
            cache = QFormerCache(presents, num_query=prior_query + num_query)
        return QFormerOutput(last_hidden_state=hidden, past_key_values=cache, image_key_values=cross_kvs)

    def image_key_values(self, image: Tensor) -> list[tuple[Tensor, Tensor] | None]:
        """Cross-attention K/V of image features [B, N, W] for every layer (None where a layer has none), to be
        reused by passes over the same images (``image_key_values=`` of ``forward``)."""
        out = []
        for layer in self.encoder.layer:
            if not layer.has_cross_attention:
                out.append(None)
                continue
            attn = layer.crossattention.self
            weight = attn.key.weight  # a method on an int8_dynamic layer (quantize_for_inference): fp32 inputs
            cast = isinstance(weight, Tensor) and not torch.is_autocast_enabled()
            states = image.to(weight.dtype) if cast else image
            out.append((attn._heads(attn.key(states)), attn._heads(attn.value(states))))
        return out


class QFormerPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.transform_act_fn = _activation(cfg.hidden_act)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden)))


class QFormerLMPrediction(nn.Module):
    """``cls.predictions``: transform + decoder whose weight is tied to the word embeddings."""

    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.transform = QFormerPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.bias = self.bias  # same tensor, as in BERT/LAVIS (both keys appear in state dicts)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.transform(hidden))


class QFormerOnlyMLMHead(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.predictions = QFormerLMPrediction(cfg)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.predictions(hidden)
