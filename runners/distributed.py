"""Process-group setup (torchrun, SLURM); the rank queries and collectives it pairs with live in ``common.dist``.

A run is distributed only when the launcher says there is more than one process
(``WORLD_SIZE`` from torchrun, ``SLURM_NTASKS`` under srun); otherwise torch.distributed is
never touched (LAVIS crashed single-process runs with an unguarded barrier).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from common.dist import is_dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``node[03-05,07],gpu1`` -> ``node03``."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        return nodelist
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def launcher_env() -> dict[str, int] | None:
    """Rank/world/local rank from torchrun or SLURM variables, or None when not launched in parallel."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {
            "rank": int(env["RANK"]),
            "world_size": int(env["WORLD_SIZE"]),
            "local_rank": int(env.get("LOCAL_RANK", 0)),
        }
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        # srun without torchrun: derive the rendezvous from SLURM's variables.
        env.setdefault("MASTER_ADDR", _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        env.setdefault("MASTER_PORT", "29500")
        return {
            "rank": int(env["SLURM_PROCID"]),
            "world_size": int(env["SLURM_NTASKS"]),
            "local_rank": int(env.get("SLURM_LOCALID", 0)),
        }
    return None


def init_distributed(device: str, timeout_minutes: float = 30.0) -> DistInfo:
    """Initialise the default process group if launched with >1 process (gloo on CPU, nccl on CUDA)."""
    info = launcher_env()
    if info is None or info["world_size"] <= 1:
        return DistInfo()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(info["local_rank"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=info["rank"],
            world_size=info["world_size"],
            timeout=timedelta(minutes=timeout_minutes),
        )
    return DistInfo(info["rank"], info["world_size"], info["local_rank"], backend)


def cleanup() -> None:
    if is_dist():
        torch.distributed.destroy_process_group()
