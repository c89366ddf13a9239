"""Several datasets in one run: concatenation, or sampling by ratios (the paper's stage-1 mix).

``combine_datasets`` picks the right wrapper:
- map-style datasets, no ratios -> ``ConcatDataset`` (every sample once per epoch);
- map-style datasets with ratios -> ``MixtureDataset`` (map-style, fixed length, deterministic
  per (seed, epoch), so a ``ResumableDistributedSampler`` resumes it exactly);
- any streaming dataset -> ``MixtureIterableDataset`` (infinite, deterministic per rank/worker).

Wrappers shift ``image_id`` per member dataset so ids never collide across datasets (ITC treats
equal ids as the same image).
"""
from __future__ import annotations

import bisect
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset, IterableDataset

from datasets.base_dataset import collate_samples
from datasets.sharding import stream_position


def _id_span(dataset: Any) -> int:
    """How many distinct image ids a member may use (ids are shifted by the spans before it)."""
    return int(getattr(dataset, "num_image_ids", None) or len(dataset))


def _shift_image_id(sample: dict[str, Any], offset: int) -> dict[str, Any]:
    if offset and isinstance(sample.get("image_id"), int):
        sample = {**sample, "image_id": sample["image_id"] + offset}
    return sample


def _check_ratios(ratios: Sequence[float], n: int) -> list[float]:
    ratios = [float(r) for r in ratios]
    if len(ratios) != n:
        raise ValueError(f"got {len(ratios)} ratios for {n} datasets")
    if any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"ratios must be non-negative with a positive sum, got {ratios}")
    total = sum(ratios)
    return [r / total for r in ratios]


class ConcatDataset(Dataset):
    """Map-style datasets one after the other, with shifted ``image_id``s and a common collater."""

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        if not datasets:
            raise ValueError("ConcatDataset needs at least one dataset")
        self.datasets = list(datasets)
        self.cumulative_sizes = list(np.cumsum([len(d) for d in self.datasets]))
        self.id_offsets = [0, *np.cumsum([_id_span(d) for d in self.datasets])[:-1].tolist()]
        self.num_image_ids = sum(_id_span(d) for d in self.datasets)

    def __len__(self) -> int:
        return int(self.cumulative_sizes[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        k = bisect.bisect_right(self.cumulative_sizes, index)
        start = 0 if k == 0 else int(self.cumulative_sizes[k - 1])
        return _shift_image_id(self.datasets[k][index - start], int(self.id_offsets[k]))

    def set_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)

    def collater(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_samples(samples)


class MixtureDataset(Dataset):
    """Map-style mixture: position ``i`` of epoch ``e`` maps to (dataset k, index j) deterministically.

    Datasets are drawn with probability ``ratios``; inside each dataset the indices follow a
    per-epoch permutation (cycled when the dataset is drawn more often than its size).
    """

    def __init__(
        self, datasets: Sequence[Dataset], ratios: Sequence[float], length: int | None = None, seed: int = 0
    ) -> None:
        self.datasets = list(datasets)
        self.ratios = _check_ratios(ratios, len(self.datasets))
        self.length = int(length if length is not None else sum(len(d) for d in self.datasets))
        self.seed = seed
        self.id_offsets = [0, *np.cumsum([_id_span(d) for d in self.datasets])[:-1].tolist()]
        self.num_image_ids = sum(_id_span(d) for d in self.datasets)
        self.epoch = 0
        self._plan: tuple[np.ndarray, np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._plan = None
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)

    def plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(dataset index [L], sample index [L]) for the current epoch."""
        if self._plan is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            which = rng.choice(len(self.datasets), size=self.length, p=self.ratios)
            index = np.zeros(self.length, dtype=np.int64)
            for k, d in enumerate(self.datasets):
                slots = np.flatnonzero(which == k)
                if len(slots) == 0:
                    continue
                n_perm = -(-len(slots) // len(d))
                perm = np.concatenate([rng.permutation(len(d)) for _ in range(n_perm)])
                index[slots] = perm[: len(slots)]
            self._plan = (which, index)
        return self._plan

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        which, index = self.plan()
        k = int(which[i])
        return _shift_image_id(self.datasets[k][int(index[i])], int(self.id_offsets[k]))

    def collater(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_samples(samples)


class MixtureIterableDataset(IterableDataset):
    """Infinite stream drawing from each member with probability ``ratios``.

    Streaming members shard themselves by rank and worker; map-style members are read through
    per-pass permutations split across ranks x workers. ``set_resume_step`` skips exactly what
    the first ``step`` batches consumed.
    """

    def __init__(self, datasets: Sequence[Dataset], ratios: Sequence[float] | None = None, seed: int = 0) -> None:
        self.datasets = list(datasets)
        self.ratios = _check_ratios(ratios if ratios is not None else [1.0] * len(self.datasets), len(self.datasets))
        self.seed = seed
        self.epoch = 0
        self.resume_step = 0
        self.resume_batch_size = 0
        spans = [1 << 40 if isinstance(d, IterableDataset) else _id_span(d) for d in self.datasets]
        self.id_offsets = [0, *np.cumsum(spans)[:-1].tolist()]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)

    def set_resume_step(self, step: int, batch_size: int) -> None:
        """Skip what ``step`` batches consumed; streaming members only rotate their worker roles
        (batch size 0: the mixture itself skips their samples)."""
        self.resume_step, self.resume_batch_size = int(step), int(batch_size)
        for d in self.datasets:
            if isinstance(d, IterableDataset) and hasattr(d, "set_resume_step"):
                d.set_resume_step(step, 0)

    def _map_stream(self, k: int, consumer: int, num_consumers: int) -> Iterator[dict[str, Any]]:
        d = self.datasets[k]
        for n_pass in range(1 << 62):
            perm = np.random.default_rng([self.seed, self.epoch, k, n_pass]).permutation(len(d))
            for j in perm[consumer::num_consumers]:
                yield d[int(j)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pos = stream_position(self.resume_step)
        streams = [
            iter(d) if isinstance(d, IterableDataset) else self._map_stream(k, pos.consumer, pos.num_consumers)
            for k, d in enumerate(self.datasets)
        ]
        rng = pos.rng(self.seed, self.epoch)
        to_skip = pos.samples_to_skip(self.resume_step, self.resume_batch_size)
        choices = range(len(self.datasets))
        while True:
            k = rng.choices(choices, weights=self.ratios)[0]
            sample = next(streams[k])
            if to_skip > 0:
                to_skip -= 1
                continue
            yield _shift_image_id(sample, int(self.id_offsets[k]))

    def collater(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_samples(samples)


def combine_datasets(
    datasets: Sequence[Dataset] | Mapping[str, Dataset],
    ratios: Sequence[float] | Mapping[str, float] | None = None,
    *,
    seed: int = 0,
    length: int | None = None,
) -> Dataset:
    """One training dataset out of several (see the module docstring for which wrapper).

    ``datasets`` may be a dict name -> dataset, then ``ratios`` may be a dict by the same names
    (e.g. the run config's ``train_dataset_ratios``). A single dataset without ratios is returned as is.
    """
    if isinstance(datasets, Mapping):
        names = list(datasets)
        if isinstance(ratios, Mapping):
            missing = [n for n in names if n not in ratios]
            if missing:
                raise ValueError(f"train_dataset_ratios has no entry for {missing}; given: {sorted(ratios)}")
            ratios = [ratios[n] for n in names]
        datasets = [datasets[n] for n in names]
    datasets = list(datasets)
    if not datasets:
        raise ValueError("combine_datasets needs at least one dataset")
    if any(isinstance(d, IterableDataset) for d in datasets):
        if len(datasets) == 1 and ratios is None:
            return datasets[0]
        return MixtureIterableDataset(datasets, ratios, seed=seed)
    if ratios is None:
        return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
    return MixtureDataset(datasets, ratios, length=length, seed=seed)
