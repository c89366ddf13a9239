"""Model wrapping for parallel training (DDP or FSDP by config) and full state dicts for checkpoints.

DDP by default when distributed; ``run.fsdp: true`` (or ``{min_num_params: N}``) shards parameters,
gradients and optimizer state with torch FSDP, for frozen LLMs that do not fit one device. Single-process runs stay unwrapped.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from runners import distributed as dist_utils


def wrap_model(model: torch.nn.Module, run_cfg: Any, device: torch.device) -> torch.nn.Module:
    if not dist_utils.is_dist():
        return model
    fsdp = run_cfg.get("fsdp", False)
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(run_cfg.get("find_unused_parameters", False)),
        )
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

        options = fsdp if hasattr(fsdp, "get") else {}
        min_params = int(options.get("min_num_params", 10_000_000))
        return FSDP(
            model,
            auto_wrap_policy=functools.partial(size_based_auto_wrap_policy, min_num_params=min_params),
            use_orig_params=True,  # frozen and trainable parameters may share a wrapped unit
            device_id=device if device.type == "cuda" else None,
            sync_module_states=True,
        )


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDP)


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_trainable_state(model: torch.nn.Module, raw_model: torch.nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
    """Trainable tensors by their plain names (collective under FSDP; call on every rank)."""
    from runners.checkpointing import trainable_state_dict

    if not _is_fsdp(model):
        return trainable_state_dict(raw_model)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_options())
    return {k: full[k].detach().cpu().contiguous().clone() for k in keys if k in full}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    if not _is_fsdp(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict | None) -> None:
    if state is None:
        raise FileNotFoundError("the checkpoint has no optimizer state; it cannot resume training")
    if not _is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options())
