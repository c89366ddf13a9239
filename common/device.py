"""Moving batches to a device and asking a module where it lives."""
from __future__ import annotations

from typing import Any

import torch


def move_to_device(samples: Any, device: torch.device | str) -> Any:
    """Tensors in (nested) dicts / lists / tuples moved to ``device``; everything else unchanged.

    ``non_blocking`` lets a copy from pinned memory overlap with compute on CUDA; on CPU it is a no-op.
    """
    if isinstance(samples, torch.Tensor):
        return samples.to(device, non_blocking=True)
    if isinstance(samples, dict):
        return {k: move_to_device(v, device) for k, v in samples.items()}
    if isinstance(samples, (list, tuple)):
        return type(samples)(move_to_device(v, device) for v in samples)
    return samples


def module_device(module: torch.nn.Module) -> torch.device:
    """Device of the module's first parameter or buffer (CPU for a module without either)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")
