"""Data loading for the runners: deterministic, resumable, rank-aware batch order.

Training batches come from ``GlobalBatchSampler``: a permutation seeded by (seed, epoch) is cut
into global batches of ``batch_size * world_size`` samples and every rank takes its own
contiguous slice. So 2 ranks x batch b see exactly the samples (and order) of 1 process x batch
2b, and the data position of a run is a single number: global batches already consumed.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's index list for each global batch; ``set_epoch`` and ``set_start`` make
    the order reproducible and resumable mid-epoch."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0
        global_batch = batch_size * world_size
        if drop_last:
            self.num_batches = num_samples // global_batch
        else:
            self.num_batches = math.ceil(num_samples / global_batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start_batch = 0

    def set_start(self, start_batch: int) -> None:
        """Skip the first ``start_batch`` global batches of the current epoch (resume)."""
        self.start_batch = start_batch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=gen).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        global_batch = self.batch_size * self.world_size
        for b in range(self.start_batch, self.num_batches):
            chunk = order[b * global_batch : (b + 1) * global_batch]
            # Contiguous per-rank slice; in a short last batch (eval) some ranks may get fewer.
            mine = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            if mine:
                yield mine

    def __len__(self) -> int:
        return max(self.num_batches - self.start_batch, 0)


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation split across ranks without padding or duplicates: rank r takes r, r+W, r+2W, ..."""

    def __init__(self, num_samples: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, num_samples, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def collate_fn_of(dataset: Dataset) -> Any:
    """The dataset's own ``collater`` (contract), looking through ConcatDataset."""
    if hasattr(dataset, "collater"):
        return dataset.collater
    if isinstance(dataset, ConcatDataset):
        return collate_fn_of(dataset.datasets[0])
    return None


def merge_train_datasets(datasets: dict[str, Dataset], ratios: Any = None, seed: int = 0) -> Dataset:
    """One training dataset from several ({name: dataset}): concatenation, or sampling by
    ``ratios`` (a list, or a mapping by dataset name), via the datasets package's mixing helper."""
    if len(datasets) == 1 and ratios is None:
        return next(iter(datasets.values()))
    from datasets.mixing import combine_datasets  # the datasets package owns multi-dataset sampling

    return combine_datasets(datasets, ratios, seed=seed)


def is_streaming(dataset: Dataset) -> bool:
    return isinstance(dataset, IterableDataset)


def train_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
    seed: int,
    pin_memory: bool = False,
) -> DataLoader:
    """Training loader: resumable global-batch sampler for map-style data, plain loader for streams."""
    generator = torch.Generator().manual_seed(seed)  # keeps the global RNG untouched by loader setup
    if is_streaming(dataset):
        return DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn_of(dataset),
            pin_memory=pin_memory, generator=generator, drop_last=True,
        )
    sampler = GlobalBatchSampler(len(dataset), batch_size, rank, world_size, shuffle=True, seed=seed)
    if len(sampler) == 0:
        raise ValueError(
            f"training set of {len(dataset)} samples is smaller than one global batch "
            f"(run.batch_size_train={batch_size} x {world_size} processes)"
        )
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn_of(dataset),
        pin_memory=pin_memory, generator=generator, persistent_workers=False,
    )


def eval_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
    split_across_ranks: bool = True,
    pin_memory: bool = False,
) -> DataLoader:
    """Evaluation loader in dataset order; shards over ranks unless ``split_across_ranks`` is False
    (retrieval needs every image on every rank)."""
    sampler = None
    if not is_streaming(dataset) and split_across_ranks and world_size > 1:
        sampler = ShardSampler(len(dataset), rank, world_size)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
        collate_fn=collate_fn_of(dataset), pin_memory=pin_memory, drop_last=False,
    )
