"""A distributed sampler that can start mid-epoch, for exact resume of map-style datasets.

Like ``torch.utils.data.DistributedSampler`` (per-epoch seeded permutation, padded so every
rank gets the same number of indices, hence equal batch counts), plus ``set_start_index`` /
``state_dict`` so a run resumed at step s of an epoch reads exactly the remaining indices.
"""
from __future__ import annotations

from typing import Iterator, Sized

import torch
from torch.utils.data import Sampler

from datasets.webdataset_stream import _dist_rank_world


class ResumableDistributedSampler(Sampler[int]):
    """Per-epoch permutation split across ranks; ``start_index`` skips this rank's first indices."""

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        default_rank, default_world = _dist_rank_world()
        self.num_replicas = num_replicas if num_replicas is not None else default_world
        self.rank = rank if rank is not None else default_rank
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} out of range for {self.num_replicas} replicas")
        self.dataset = dataset
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        n = len(dataset)
        if drop_last:
            self.num_samples = n // self.num_replicas
        else:
            self.num_samples = -(-n // self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start_index(self, start_index: int) -> None:
        """Skip the first ``start_index`` indices of this rank in the current epoch (e.g. step * batch)."""
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"start_index {start_index} outside [0, {self.num_samples}]")
        self.start_index = int(start_index)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start_index": self.start_index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state.get("seed", self.seed))
        self.set_epoch(state["epoch"])
        self.set_start_index(state["start_index"])

    def indices(self) -> list[int]:
        """All indices of this rank for the current epoch (before ``start_index``)."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.drop_last:
            order = order[: self.total_size]
        else:
            while len(order) < self.total_size:  # pad by repeating so every rank has num_samples
                order += order[: self.total_size - len(order)]
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        mine = self.indices()[self.start_index :]
        self.start_index = 0  # the skip applies to the resumed epoch only
        return iter(mine)

    def __len__(self) -> int:
        return self.num_samples - self.start_index
