"""Lean CPU attention/dropout: same outputs, gradients and dropout draws as PyTorch's, with less saved for backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.lean_attention import LeanDropout, attention
from models.qformer import QFormer
from tests.test_qformer import TINY, _inputs


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn()`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("mask_shape", [None, (2, 1, 5, 9), (2, 1, 1, 9)])
def test_attention_matches_sdpa_with_the_same_dropout(mask_shape):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for n in (5, 9, 9))
    mask = None
    if mask_shape is not None:
        mask = torch.rand(mask_shape, generator=g) > 0.4
        mask[..., 0] = True
    grad_out = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)
    torch.manual_seed(7)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.3)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    torch.manual_seed(7)
    out = attention(q, k, v, mask, 0.3)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_attention_saves_less_than_sdpa():
    q, k, v = (torch.randn(4, 4, n, 16, requires_grad=True) for n in (32, 64, 64))
    lean = _saved_bytes(lambda: attention(q, k, v, None, 0.1))
    sdpa = _saved_bytes(lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1))
    assert lean < 0.6 * sdpa


def test_dropout_same_draws_and_bool_mask():
    x = torch.randn(6, 10, requires_grad=True)
    torch.manual_seed(3)
    ref = F.dropout(x, 0.2, True)
    torch.manual_seed(3)
    out = LeanDropout(0.2)(x)
    assert torch.equal(out, ref)
    assert torch.equal(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0])
    assert _saved_bytes(lambda: LeanDropout(0.2)(x)) < _saved_bytes(lambda: F.dropout(x, 0.2, True)) / 2


def test_qformer_training_step_unchanged_by_lean_path(monkeypatch):
    """A training-mode (dropout on) Q-Former pass gives the same loss and grads through SDPA/F.dropout."""
    import models.qformer_layers as qformer_module

    queries, image, ids = _inputs()
    att = torch.ones(ids.shape[0], queries.shape[1] + ids.shape[1], dtype=torch.long)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = QFormer(TINY).train()
        torch.manual_seed(1)
        out = model(ids, attention_mask=att, query_embeds=queries, encoder_hidden_states=image, labels=ids)
        out.loss.backward()
        return out.loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]

    loss, grads = run()
    monkeypatch.setattr(qformer_module, "attention", lambda q, k, v, m, p: F.scaled_dot_product_attention(q, k, v, m, p))
    monkeypatch.setattr(LeanDropout, "forward", torch.nn.Dropout.forward)
    ref_loss, ref_grads = run()
    torch.testing.assert_close(loss, ref_loss)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
