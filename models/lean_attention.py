"""Memory-lean attention and dropout for training on CPU, numerically the same as PyTorch's own.

With attention dropout in training, ``F.scaled_dot_product_attention`` on CPU takes its math path, which keeps
six tensors per call for backward (scaled Q, a contiguous scaled K^T, the probabilities, a float dropout noise,
the dropped probabilities and V); ``F.dropout`` on CPU keeps a float noise tensor as large as its input. In a
stage-1 Q-Former step these were about 1.2 GB of the 2.3 GB of saved activations. Here the attention keeps Q, K,
V, the probabilities and a one-byte dropout mask, and rebuilds the dropped probabilities in backward (one
elementwise product); dropout keeps a one-byte mask. Both draw the same random numbers in the same order as the
PyTorch calls they replace, so a seeded run gives the same dropout masks and results equal up to float rounding.
GPUs keep PyTorch's fused kernels, which already store little.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _DropoutAttention(torch.autograd.Function):
    """``dropout(softmax(q k^T / sqrt(d) | mask)) v`` that saves q, k, v, the probabilities and a bool mask."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float) -> Tensor:
        scale = q.shape[-1] ** -0.5
        scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)  # [B, h, L, K]
        if mask is not None:  # bool, True = may attend; every row has at least one True (see self_attention_mask)
            scores.masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        del scores
        dropped, keep = torch.native_dropout(probs, dropout_p, True)  # same draws as at::dropout in SDPA's math path
        ctx.save_for_backward(q, k, v, probs, keep)
        ctx.scale, ctx.keep_scale = scale, 1.0 / (1.0 - dropout_p)
        return torch.matmul(dropped, v)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out: Tensor):
        q, k, v, probs, keep = ctx.saved_tensors
        dropped = probs * keep * ctx.keep_scale
        grad_v = torch.matmul(dropped.transpose(-2, -1), grad_out)
        del dropped
        grad_probs = torch.matmul(grad_out, v.transpose(-2, -1)).mul_(keep).mul_(ctx.keep_scale)
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype).mul_(ctx.scale)
        grad_q = torch.matmul(grad_scores, k) if ctx.needs_input_grad[0] else None
        grad_k = torch.matmul(grad_scores.transpose(-2, -1), q) if ctx.needs_input_grad[1] else None
        return grad_q, grad_k, grad_v if ctx.needs_input_grad[2] else None, None, None


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float) -> Tensor:
    """Scaled dot-product attention [B, h, L, d] with a bool ``mask`` (True = attend) and dropout ``dropout_p``
    (pass 0 outside training). On CPU with dropout and autograd, the lean path above; else PyTorch's SDPA."""
    lean = (
        dropout_p > 0.0 and q.device.type == "cpu" and torch.is_grad_enabled()
        and (mask is None or mask.dtype == torch.bool) and (q.requires_grad or k.requires_grad or v.requires_grad)
    )
    if lean:
        return _DropoutAttention.apply(q, k, v, mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class LeanDropout(nn.Dropout):
    """``nn.Dropout`` that keeps a one-byte mask for backward on CPU (``F.dropout`` there keeps a float noise)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and 0.0 < self.p < 1.0 and x.device.type == "cpu" and not self.inplace:
            return torch.native_dropout(x, self.p, True)[0]
        return super().forward(x)
