"""Distributed queries and collectives that are safe without ``torch.distributed``.

Every function here is the identity (or rank 0 of 1) unless a process group is initialised, so a
single-process run never touches ``torch.distributed``. Process-group *setup* is the runner's job
(``runners/distributed.py``); the models' gathers with gradient are in ``models/dist.py``.
"""
from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor


def is_dist() -> bool:
    """True only inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s object on every rank (identity when not distributed)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's object, in rank order, on every rank."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum a small tensor over ranks (identity when not distributed)."""
    if is_dist():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
