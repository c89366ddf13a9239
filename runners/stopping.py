"""Graceful stop on the signals clusters send before killing a job (SLURM, Kubernetes: SIGTERM; SLURM
``--signal``: SIGUSR1) and on Ctrl-C: the current optimizer step finishes, a checkpoint is written, and
the run exits with ``runners.cli.EXIT_PREEMPTED``; ``--resume auto`` then continues exactly.

A second SIGINT aborts at once (KeyboardInterrupt). Which signals stop gracefully is ``run.stop_signals``.
Under DDP the ranks agree after every step (one tiny all-reduce), so all of them stop at the same step.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterable, Iterator

import torch

from common import dist as dist_utils

logger = logging.getLogger("runners")

DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
STOPPABLE_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGQUIT")

_requested: list[str] = []  # names of the signals received while a run was listening


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was written (its path is in the message)."""


def _handler(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
    name = signal.Signals(signum).name
    if name == "SIGINT" and "SIGINT" in _requested:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt("second SIGINT: aborting without a checkpoint")
    _requested.append(name)
    logger.warning("%s received: finishing the current step, then writing a checkpoint and exiting%s", name,
                   " (press Ctrl-C again to abort at once)" if name == "SIGINT" else "")


@contextlib.contextmanager
def stop_signals(names: Iterable[str]) -> Iterator[None]:
    """Within the block, the named signals request a graceful stop instead of killing the process."""
    names = list(names or ())
    if threading.current_thread() is not threading.main_thread():
        names = []  # signal handlers can only be installed from the main thread
    previous = {}
    _requested.clear()
    try:
        for name in names:
            signum = getattr(signal, str(name).upper())
            previous[signum] = signal.signal(signum, _handler)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _requested.clear()


def requested_signal() -> str | None:
    """The first stop signal received by this process, if any."""
    return _requested[0] if _requested else None


def should_stop() -> bool:
    """True on every rank when any rank received a stop signal (collective under DDP)."""
    flag = torch.tensor([1.0 if _requested else 0.0], dtype=torch.float64)
    if dist_utils.is_dist():
        if torch.distributed.get_backend() == "nccl":  # NCCL reduces only CUDA tensors
            flag = flag.to(torch.device("cuda", torch.cuda.current_device()))
        flag = dist_utils.all_reduce_sum(flag)
    return bool(flag.item() > 0)
