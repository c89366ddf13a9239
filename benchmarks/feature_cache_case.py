"""(h) One stage-2 training epoch with and without a warm frozen-feature cache.

An "epoch" here is 4 batches of BENCH size over a fixed image set with deterministic (eval-style)
preprocessing, which is when `cache_image_features: true` is valid.
"""
from __future__ import annotations

from typing import Callable

import torch

from benchmarks.bench_config import optimizer_for
from benchmarks.text import autocast, captions

BATCHES_PER_EPOCH = 4


def setup_epoch(model, dims: dict, precision: str, work_dir: str, cached: bool) -> Callable[[], float]:
    """Returns a callable running one epoch; with `cached`, the harness's warm-up call fills the cache."""
    batch, size = dims["batch"], dims["image_size"]
    gen = torch.Generator().manual_seed(4)
    batches = [
        {"image": torch.randn(batch, 3, size, size, generator=gen), "text_input": captions(batch, seed=10 + i)}
        for i in range(BATCHES_PER_EPOCH)
    ]
    if cached:
        model.enable_feature_cache(work_dir)
    optimizer = optimizer_for(model)

    def epoch() -> float:
        total = 0.0
        for samples in batches:
            with autocast(precision):
                loss = model(samples)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += float(loss)
        return total

    return epoch
