"""Where a streaming dataset's iterator runs (rank x DataLoader worker) and how it resumes.

Streams split their work over ``num_consumers = world_size * num_workers`` consumers and seed
their RNG per consumer, so the data order is a pure function of (seed, epoch, rank, worker).
A DataLoader hands out batches round-robin starting at worker 0, every time it is created. After
``step`` batches, logical worker ``w`` has produced ``ceil((step - w) / W)`` of them and the next
batch belongs to worker ``step % W``; ``stream_position`` therefore rotates the roles so that the
resumed loader's physical worker ``w`` continues logical worker ``(w + step) % W``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from torch.utils.data import get_worker_info

from common.dist import get_rank, get_world_size


@dataclass(frozen=True)
class StreamPosition:
    rank: int
    world: int
    worker: int  # logical worker (after the resume rotation)
    num_workers: int

    @property
    def consumer(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def num_consumers(self) -> int:
        return self.world * self.num_workers

    def samples_to_skip(self, resume_step: int, batch_size: int) -> int:
        """Samples this logical worker produced in the first ``resume_step`` batches."""
        if resume_step <= 0:
            return 0
        batches = (resume_step - self.worker + self.num_workers - 1) // self.num_workers
        return max(batches, 0) * batch_size

    def rng(self, seed: int, epoch: int) -> random.Random:
        """An RNG private to (seed, epoch, rank, logical worker)."""
        return random.Random(((seed * 1_000_003 + epoch) * 1_000_003 + self.rank) * 1_000_003 + self.worker)


def stream_position(resume_step: int = 0) -> StreamPosition:
    """The calling iterator's position, with worker roles rotated for a resume at ``resume_step``."""
    rank, world = get_rank(), get_world_size()
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return StreamPosition(rank, world, (worker + resume_step) % num_workers, num_workers)
