"""AdamW over trainable parameters only, with per-group weight decay and ``lr_scale``."""
from __future__ import annotations

import sys
from typing import Any

import torch


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases, norm weights and every 1-d parameter (e.g. temperatures) get no weight decay."""
    lname = name.lower()
    return param.ndim < 2 or lname.endswith(".bias") or "norm" in lname or "ln_" in lname


def default_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups (decay / no decay) of the parameters that require grad."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_param_groups(model: torch.nn.Module, weight_decay: float, lr_layer_decay: float) -> list[dict]:
    """The model's own ``get_optimizer_params`` (layer-wise LR decay lives there) or the default.

    Whatever the source, frozen parameters are removed, empty groups dropped, and a parameter
    listed twice is an error (it would be updated twice per step).
    """
    if hasattr(model, "get_optimizer_params"):
        groups = model.get_optimizer_params(weight_decay, lr_layer_decay)
    else:
        groups = default_param_groups(model, weight_decay)
    cleaned, seen = [], set()
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        for p in params:
            if id(p) in seen:
                raise ValueError("a parameter appears in two optimizer groups of get_optimizer_params()")
            seen.add(id(p))
        if params:
            cleaned.append({**group, "params": params})
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"trainable parameters missing from the optimizer groups: {missing[:10]}")
    if not cleaned:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    return cleaned


def build_optimizer(model: torch.nn.Module, run_cfg: Any) -> torch.optim.AdamW:
    """AdamW with ``run.init_lr``, betas ``(run.beta1, run.beta2)``, ``run.weight_decay`` and ``run.adam_eps``."""
    get = run_cfg.get
    groups = build_param_groups(model, float(get("weight_decay", 0.05)), float(get("lr_layer_decay", 1.0)))
    betas = (float(get("beta1", 0.9)), float(get("beta2", 0.999)))
    return torch.optim.AdamW(groups, lr=float(get("init_lr")), betas=betas, eps=float(get("adam_eps", 1e-8)),
                             weight_decay=float(get("weight_decay", 0.05)),
                             fused=can_fuse([p for g in groups for p in g["params"]]))


def can_fuse(params: list[torch.Tensor]) -> bool:
    """Whether AdamW's fused kernel (one pass over each parameter instead of ~10 elementwise passes; the same
    update up to float rounding) handles these parameters: plain float tensors on CPU or CUDA. Sharded (FSDP
    DTensor) parameters keep the default implementation."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported yet: no DTensor exists (spares ~2 s)
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point()
        and not (dtensor is not None and isinstance(p, dtensor.DTensor)) for p in params
    )


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
