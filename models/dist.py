"""Collectives used inside models (ITC/ITM gathers). A non-distributed run never calls torch.distributed.

The rank queries are ``common.dist``'s (re-exported here for the models).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from common.dist import get_rank, get_world_size  # noqa: F401 (re-exported for the models)


def mean_tokens_per_rank(count: Tensor) -> Tensor:
    """The token count that makes per-rank token sums, averaged over ranks by DDP, equal the global token mean.

    One process: the local count (a plain mean). Distributed: global count / world size (no gradient).
    """
    count = count.detach().float()
    if get_world_size() > 1:
        count = count.clone()
        dist.all_reduce(count)
        count = count / get_world_size()
    return count.clamp(min=1.0)


def global_token_mean(local_mean: Tensor, local_count: Tensor) -> Tensor:
    """A rank's share of the global batch's token-mean loss, from its own token mean and token count.

    DDP averages gradients over ranks, so rank r contributes sum_r / (sum_all counts / world): with texts of
    different lengths on different ranks, 2 ranks x b then equal 1 process x 2b. Unchanged without DDP.
    """
    if get_world_size() == 1:
        return local_mean
    return local_mean * local_count.detach().float().clamp(min=1.0) / mean_tokens_per_rank(local_count)


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
