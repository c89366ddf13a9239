"""Resumable checkpoints: trainable weights (safetensors) + optimizer + run state, written atomically.

Layout of one checkpoint directory::

    <job_dir>/checkpoints/step_00000012/
        model.safetensors   trainable parameters and non-frozen buffers only
        optimizer.pt        optimizer state dict (torch.load(weights_only=True) safe)
        state.pt            epoch, global step, data position, LR schedule, GradScaler,
                            best metric, RNG states of every rank (python, numpy, torch, cuda)

Each directory is written under a temporary name and renamed into place, so a run killed while
saving never leaves a half-written checkpoint that ``--resume auto`` would pick up.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


# -- RNG ---------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states in a weights_only-loadable form (numpy arrays become tensors)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- weights -----------------------------------------------------------------------------------
def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's ``trainable_state_dict()`` (contract), or every requires_grad parameter."""
    if hasattr(model, "trainable_state_dict"):
        sd = model.trainable_state_dict()
    else:
        sd = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # safetensors refuses shared storage and needs contiguous CPU tensors.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint directory, a .safetensors file, or a .pth (``{"model": sd}`` or sd)."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path} (expected a checkpoint directory or a weights file)")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


def load_trainable_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a trainable-only state dict into ``model``; keys missing from the file must all be
    frozen (requires_grad False) parameters or frozen buffers, and no key may be unknown."""
    state = read_weights(path)
    result = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing_trainable = sorted(set(result.missing_keys) & trainable)
    if result.unexpected_keys or missing_trainable:
        raise KeyError(
            f"checkpoint {path} does not match the model: unexpected keys {result.unexpected_keys[:10]}, "
            f"trainable parameters missing from it {missing_trainable[:10]}"
        )


# -- checkpoint directories ----------------------------------------------------------------------
def save_checkpoint(
    directory: str | os.PathLike,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict | None,
    state: dict[str, Any],
) -> Path:
    """Write one checkpoint directory atomically (temp directory + rename); returns its path."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(model_state, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
    torch.save(state, tmp / STATE_FILE)
    for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # re-saving the same name (e.g. best): swap via a second rename
        old = final.parent / f".{final.name}.old{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def load_checkpoint_state(directory: str | os.PathLike) -> tuple[dict | None, dict]:
    """(optimizer state or None, run state) of a checkpoint directory, loaded weights_only."""
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"{directory} is not a resumable checkpoint (no {STATE_FILE}); expected a directory "
            f"written by the runner, e.g. <output_dir>/<job>/checkpoints/step_00000100"
        )
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    opt_path = directory / OPTIMIZER_FILE
    optimizer = torch.load(opt_path, map_location="cpu", weights_only=True) if opt_path.is_file() else None
    return optimizer, state


def step_checkpoints(job_dir: str | os.PathLike) -> list[Path]:
    """Complete resumable checkpoints of a job, oldest first."""
    root = Path(job_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(job_dir: str | os.PathLike) -> Path | None:
    ckpts = step_checkpoints(job_dir)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(job_dir: str | os.PathLike, keep_last: int, keep: set[Path] = frozenset()) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints (never those in ``keep``)."""
    if keep_last <= 0:
        return
    ckpts = step_checkpoints(job_dir)
    for path in ckpts[:-keep_last]:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
