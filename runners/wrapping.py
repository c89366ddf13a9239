"""Model wrapping for parallel training (DDP or FSDP by config) and full state dicts for checkpoints.

DDP by default when distributed; ``run.fsdp: true`` (or ``{min_num_params: N}``) shards parameters,
gradients and optimizer state with torch FSDP, for frozen LLMs that do not fit one device. Single-process runs stay unwrapped.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from common import dist as dist_utils
from runners.checkpointing import load_trainable_weights, read_weights, trainable_state_dict


def wrap_model(model: torch.nn.Module, run_cfg: Any, device: torch.device) -> torch.nn.Module:
    """DDP, or FSDP (``fully_shard``) when ``run.fsdp`` is set; unchanged when not distributed."""
    if not dist_utils.is_dist():
        return model
    fsdp = run_cfg.get("fsdp", False)
    if not fsdp:
        return DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(run_cfg.get("find_unused_parameters", False)),
        )
    # torch.distributed FSDP/DTensor/DCP: ~2 s to import, only for sharded runs
    from torch.distributed.fsdp import fully_shard

    options = fsdp if hasattr(fsdp, "get") else {}
    min_params = int(options.get("min_num_params", 10_000_000))
    # Shard bottom-up every submodule holding >= min_params parameters not already sharded, then the root.
    sharded: set[int] = set()
    for module in reversed(list(model.modules())):
        if module is model:
            continue
        own = [p for p in module.parameters() if id(p) not in sharded]
        if own and sum(p.numel() for p in own) >= min_params:
            fully_shard(module)
            sharded.update(id(p) for p in own)
    fully_shard(model)
    return model


def _is_fsdp(model: torch.nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported yet: nothing was sharded (spares ~2 s)
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def _options() -> Any:
    # torch.distributed FSDP/DTensor/DCP: ~2 s to import, only for sharded runs
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_trainable_state(model: torch.nn.Module, raw_model: torch.nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
    """Trainable tensors by their plain names (collective under FSDP; call on every rank)."""
    if not _is_fsdp(model):
        return trainable_state_dict(raw_model)
    # torch.distributed FSDP/DTensor/DCP: ~2 s to import, only for sharded runs
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_options())
    return {k: full[k].detach().cpu().contiguous().clone() for k in keys if k in full}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    if not _is_fsdp(model):
        return optimizer.state_dict()
    # torch.distributed FSDP/DTensor/DCP: ~2 s to import, only for sharded runs
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict | None) -> None:
    if state is None:
        raise FileNotFoundError("the checkpoint has no optimizer state; it cannot resume training")
    if not _is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    # torch.distributed FSDP/DTensor/DCP: ~2 s to import, only for sharded runs
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options())


def load_weights(model: torch.nn.Module, raw_model: torch.nn.Module, path: Any) -> None:
    """Trainable weights from a checkpoint into a (possibly FSDP-sharded) model; every rank reads the file."""
    if not _is_fsdp(model):
        load_trainable_weights(raw_model, path)
        return
    # torch.distributed FSDP/DTensor/DCP: ~2 s to import, only for sharded runs
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, read_weights(path), options=StateDictOptions(full_state_dict=True, strict=False))
