"""The Q-Former's data types: its sizes (``QFormerConfig``), its self-attention KV cache and its outputs.

Kept apart from the network (``models/qformer_layers.py``) so that decoding, validation and plugins can name them
without building anything.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Mapping

from torch import Tensor


@dataclass
class QFormerConfig:
    """Sizes of a Q-Former; the defaults are BLIP-2's (bert-base, 32 queries, ViT-g image features)."""

    vocab_size: int = 30523
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    encoder_width: int = 1408
    cross_attention_freq: int = 2
    num_query_token: int = 32
    pad_token_id: int = 0
    gradient_checkpointing: bool = False

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, where: str = "qformer config") -> "QFormerConfig":
        """Build from a mapping; unknown keys raise naming the key, the close matches and the valid keys."""
        values = dict(values or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=3)
                raise KeyError(
                    f"{where}: unknown key '{key}'"
                    + (f" (did you mean {', '.join(close)}?)" if close else "")
                    + f". Valid keys: {', '.join(valid)}"
                )
        cfg = cls(**values)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(
                f"{where}: hidden_size={cfg.hidden_size} is not divisible by num_attention_heads={cfg.num_attention_heads}"
            )
        if cfg.cross_attention_freq < 1:
            raise ValueError(f"{where}: cross_attention_freq must be >= 1, got {cfg.cross_attention_freq}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class QFormerCache:
    """Self-attention keys/values of earlier positions, per layer: ``layers[i] = (key, value)`` [B, heads, L, head_dim].

    The first ``num_query`` cached positions are queries, the rest are text (queries always come first).
    Cross-attention K/V are never needed after the query pass: text positions do not attend to the image.
    """

    layers: list[tuple[Tensor, Tensor]]
    num_query: int

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0

    @property
    def text_length(self) -> int:
        return self.length - self.num_query

    def map(self, fn) -> "QFormerCache":
        return QFormerCache([(fn(k), fn(v)) for k, v in self.layers], self.num_query)

    def repeat_interleave(self, repeats: int) -> "QFormerCache":
        """Repeat every sample ``repeats`` times along the batch (for beams or several texts per image)."""
        return self.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def index_select(self, index: Tensor) -> "QFormerCache":
        """Reorder/select samples along the batch (beam search)."""
        return self.map(lambda t: t.index_select(0, index))


@dataclass
class QFormerOutput:
    last_hidden_state: Tensor  # [B, Q + T, H]
    past_key_values: QFormerCache | None = None
    # per layer: the cross-attention K/V of the image [B, heads, N, head_dim], None for layers without it
    image_key_values: list[tuple[Tensor, Tensor] | None] | None = None


@dataclass
class QFormerLMOutput:
    logits: Tensor | None  # [B, T, vocab] (text positions only); None when return_logits=False
    loss: Tensor | None = None
    past_key_values: QFormerCache | None = None
