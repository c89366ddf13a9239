"""Collectives used inside models (ITC/ITM gathers). A non-distributed run never calls torch.distributed.

The rank queries are ``common.dist``'s (re-exported here for the models).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from common.dist import get_rank, get_world_size  # noqa: F401 (re-exported for the models)


@torch.no_grad()
def all_gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, without gradient ([B, ...] -> [world*B, ...])."""
    if get_world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduces the incoming gradients and returns this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> tuple[Tensor, ...]:
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return tuple(gathered)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> Tensor:
        stacked = torch.stack(grads)  # [world, B, ...]
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 with gradients flowing back to each rank's own slice.

    The backward sums the gradient every rank computed for each slice, so the result equals one process holding
    the whole global batch.
    """
    if get_world_size() == 1:
        return tensor
    return torch.cat(_GatherWithGrad.apply(tensor), dim=0)
