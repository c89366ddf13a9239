"""What a frozen-LLM adapter's forward returns, and the token-level negative log-likelihoods it is computed from
(``models/llm_adapter.py``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LLMOutput:
    """What an adapter forward returns. ``nll``/``num_tokens`` are per sample (sum over target tokens)."""

    # [B, T, V] (decoder-only: over the whole input; seq2seq: over the decoder targets); None when the adapter was
    # called with return_logits=False
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None  # mean token NLL over all non-ignored labels
    nll: torch.Tensor | None = None  # [B] summed token NLL
    num_tokens: torch.Tensor | None = None  # [B] number of scored tokens


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL in fp32 for already aligned ``logits`` [B,T,V] and ``labels`` [B,T] (-100 ignored).

    Returns (nll [B,T] with zeros at ignored positions, mask [B,T] bool).
    """
    mask = labels.ne(-100)
    return scored_rows_nll(logits[mask], labels, mask), mask


def scored_rows_nll(rows: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NLL [B,T] in fp32 (zeros where ``mask`` [B,T] is False) from the logits ``rows`` [n, V] of the True positions
    of ``mask`` in row-major order. Contiguous rows make log-softmax a fast inner-dim reduction (a cross-entropy over
    the class dim of a transposed [B, V, T] view is a strided one, several times slower, over every position)."""
    picked = F.cross_entropy(rows.float(), labels[mask], reduction="none")  # [n]
    return torch.zeros(labels.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)


def output_with_loss(logits: torch.Tensor | None, nll: torch.Tensor, mask: torch.Tensor) -> LLMOutput:
    """The adapter output from per-token ``nll`` [B,T] and its ``mask`` [B,T]: the mean over scored tokens as ``loss``,
    per-sample sums and counts."""
    num_tokens = mask.sum(1)
    loss = nll.sum() / num_tokens.sum().clamp(min=1)
    return LLMOutput(logits=logits, loss=loss, nll=nll.sum(1), num_tokens=num_tokens)
