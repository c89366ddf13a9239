"""AdamW over trainable parameters only, with per-group weight decay and ``lr_scale`` (from the model's layer-wise
LR decay and from ``run.lr_scales``)."""
from __future__ import annotations

import sys
from collections.abc import Mapping
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


def _under(name: str, prefix: str) -> bool:
    """Whether parameter ``name`` lies under ``prefix`` in whole dotted components (``proj`` holds ``proj.weight``,
    not ``projector.weight``)."""
    return name == prefix or name.startswith(prefix + ".")


def scale_lr_by_prefix(model: torch.nn.Module, groups: list[dict], lr_scales: Mapping[str, Any]) -> list[dict]:
    """``run.lr_scales`` ({parameter-name prefix: factor}): a parameter under a prefix (the longest one that matches,
    whole dotted components) has its group's ``lr_scale`` multiplied by the factor; each group is split by factor.
    A prefix that names no trainable parameter, or a factor that is not a number >= 0, is an error. Empty: the
    groups unchanged (every parameter at the schedule's LR, as the released recipes train)."""
    if not lr_scales:
        return groups
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    factors: dict[str, float] = {}
    for prefix, factor in dict(lr_scales).items():
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 0:
            raise ValueError(f"run.lr_scales.{prefix}: the LR factor must be a number >= 0, got {factor!r}")
        if not any(_under(n, prefix) for n in names.values()):
            tops = sorted({n.split(".")[0] for n in names.values()})
            raise ValueError(f"run.lr_scales: {prefix!r} names no trainable parameter; trainable parameters are "
                             f"under {', '.join(tops)}")
        factors[str(prefix)] = float(factor)

    def factor_of(name: str) -> float:
        matches = [p for p in factors if _under(name, p)]
        return factors[max(matches, key=len)] if matches else 1.0

    split: list[dict] = []
    for group in groups:
        by_factor: dict[float, list] = {}
        for param in group["params"]:
            by_factor.setdefault(factor_of(names[id(param)]), []).append(param)
        for factor, params in by_factor.items():
            split.append({**group, "params": params, "lr_scale": group.get("lr_scale", 1.0) * factor})
    return split


def build_optimizer(model: torch.nn.Module, run_cfg: Any) -> torch.optim.AdamW:
    """AdamW with ``run.init_lr``, betas ``(run.beta1, run.beta2)``, ``run.weight_decay``, ``run.adam_eps`` and
    ``run.lr_scales``."""
    get = run_cfg.get
    groups = build_param_groups(model, float(get("weight_decay", 0.05)), float(get("lr_layer_decay", 1.0)))
    groups = scale_lr_by_prefix(model, groups, get("lr_scales", None) or {})
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
