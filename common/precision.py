"""The precision policy, one rule for image encoders, LLMs and AMP alike.

Names: ``fp32``, ``bf16``, ``fp16`` (and ``auto``/``None`` where a caller allows a device default).
The rule: fp16 is a CUDA compute type. Wherever fp16 would compute without CUDA (an encoder's or LLM's weights,
or ``run.amp``), fp32 is used instead, with a warning: CPU fp16 kernels are pathologically slow. bf16 is honoured
on every device; on a CPU without native bf16 (AVX512-BF16 / AMX) it is emulated and slow, and a warning says so.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import warnings

import torch
from torch import nn

logger = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(name: str, what: str = "precision") -> torch.dtype:
    """``fp32 | bf16 | fp16`` -> dtype; anything else is a ValueError naming ``what`` and the valid names."""
    if name not in PRECISIONS:
        raise ValueError(f"{what} must be one of {', '.join(PRECISIONS)}; got {name!r}")
    return PRECISIONS[name]


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:  # not Linux: trust torch's own dispatch level
        return "AVX512" in torch.backends.cpu.get_cpu_capability()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(dtype: torch.dtype, on_cuda: bool, what: str = "precision", warn: bool = True) -> torch.dtype:
    """The dtype that actually computes: ``dtype``, except fp16 without CUDA, which becomes fp32 (the rule)."""
    if dtype == torch.float16 and not on_cuda:
        if warn:
                logger.warning("%s fp16 without CUDA: computing in fp32 (fp16 kernels are pathologically slow on CPU)",
                           what)
        return torch.float32
    return dtype


def resolve_precision(name: str | None, cuda_default: str = "fp16", what: str = "precision",
                      on_cuda: bool | None = None) -> torch.dtype:
    """Precision name -> the dtype weights are built in.

    ``auto`` / ``None``: ``cuda_default`` when CUDA is available, else fp32. ``on_cuda`` defaults to
    ``torch.cuda.is_available()`` (weights are built before they are moved, so "will run on CUDA" is the question).
    """
    if on_cuda is None:
        on_cuda = torch.cuda.is_available()
    if name in (None, "auto"):
        return precision_dtype(cuda_default, what) if on_cuda else torch.float32
    if name not in PRECISIONS:
        raise ValueError(f"{what} must be one of auto, {', '.join(PRECISIONS)}; got {name!r}")
    return compute_dtype(PRECISIONS[name], on_cuda, what)


def resolve_amp(amp: object, device: torch.device) -> torch.dtype | None:
    """``run.amp`` (bf16 | fp16 | off, or LAVIS's True/False) -> autocast dtype, or None for no autocast.

    LAVIS's ``True`` means fp16. The rule applies: fp16 on a device other than CUDA gives no autocast (fp32).
    """
    if amp is None or amp is False or str(amp).lower() in ("off", "false", "none", "fp32", "no"):
        return None
    value = "fp16" if str(amp).lower() == "true" else str(amp).lower()
    if value not in ("bf16", "fp16"):
        raise ValueError(f"run.amp must be one of bf16, fp16, off; got {amp!r}")
    if value == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn(
            "run.amp=bf16 on a CPU without AVX512-BF16/AMX: bf16 matmuls are emulated and much slower than "
            "fp32 here; use amp: off on this machine", RuntimeWarning, stacklevel=2)
    dtype = compute_dtype(PRECISIONS[value], device.type == "cuda", "run.amp")
    return None if dtype == torch.float32 else dtype


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``; a null context for ``None`` or fp32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def cpu_safe_(module: nn.Module, what: str = "module") -> nn.Module:
    """The rule applied to weights already built: fp16 parameters and buffers of a module on CPU become fp32.

    bf16 and fp32 tensors, and tensors on CUDA, are left as they are. Returns ``module``.
    """
    changed = False
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.dtype == torch.float16 and param.device.type == "cpu":
                param.data = param.data.float()
                changed = True
        for name, buf in list(sub.named_buffers(recurse=False)):
            if buf is not None and buf.dtype == torch.float16 and buf.device.type == "cpu":
                sub._buffers[name] = buf.float()
                changed = True
    if changed:
        logger.warning("%s has fp16 weights on CPU: converted to fp32 (fp16 kernels are pathologically slow "
                       "on CPU)", what)
    return module
