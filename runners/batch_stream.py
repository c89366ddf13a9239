"""A resumable stream of training batches over data epochs.

Tracks the data position (data epoch, batches consumed in it) that checkpoints store, and
re-creates the loader iterator at each data epoch with ``set_epoch`` so the order is a pure
function of (seed, epoch). Streaming datasets that offer ``set_resume_step`` (the datasets
package's mixtures) skip what was consumed on resume; other streams restart, with a warning.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

from torch.utils.data import DataLoader

from runners.data import GlobalBatchSampler

logger = logging.getLogger("runners")


class BatchStream:
    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.sampler = loader.batch_sampler if isinstance(loader.batch_sampler, GlobalBatchSampler) else None
        self.data_epoch = 0
        self.batch_in_epoch = 0
        self._iter: Iterator[Any] | None = None

    @property
    def resumable(self) -> bool:
        return self.sampler is not None

    def batches_per_epoch(self) -> int | None:
        """Batches in one full data epoch (None for streams without a length)."""
        return self.sampler.num_batches if self.sampler is not None else None

    def start_epoch(self, data_epoch: int, start_batch: int = 0) -> None:
        """Position the stream at ``start_batch`` of ``data_epoch``."""
        self.data_epoch = data_epoch
        self.batch_in_epoch = start_batch
        if hasattr(self.loader.dataset, "set_epoch"):  # mixtures re-draw their plan per epoch
            self.loader.dataset.set_epoch(data_epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(data_epoch)
            self.sampler.set_start(start_batch)
        elif hasattr(self.loader.dataset, "set_resume_step"):  # streaming mixture: skip what was consumed
            self.loader.dataset.set_resume_step(start_batch, self.loader.batch_size or 1)
        self._iter = iter(self.loader)

    def next(self) -> Any:
        """The next batch, rolling over to the next data epoch when one is exhausted."""
        if self._iter is None:
            self.start_epoch(self.data_epoch, self.batch_in_epoch)
        try:
            batch = next(self._iter)
        except StopIteration:
            self.start_epoch(self.data_epoch + 1)
            try:
                batch = next(self._iter)
            except StopIteration:
                raise RuntimeError("the training loader yields no batch at all (empty dataset?)") from None
        self.batch_in_epoch += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"data_epoch": self.data_epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not self.resumable and not hasattr(self.loader.dataset, "set_resume_step"):
            logger.warning("streaming training data: resuming restarts the stream (its position is not restorable)")
            self.start_epoch(int(state["data_epoch"]))
            return
        self.start_epoch(int(state["data_epoch"]), int(state["batch_in_epoch"]))
