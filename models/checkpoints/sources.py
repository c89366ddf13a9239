"""Where checkpoint tensors come from: a local file or directory, an http(s) URL or a Hugging Face hub id, read
as safetensors or ``torch.load(weights_only=True)`` (never unpickling code), whole or a selection of names.

URLs are cached in the torch hub cache; hub ids are downloaded through ``huggingface_hub``, which honours
``HF_HUB_OFFLINE``. A directory may hold Hugging Face shards (with an index), one HF weight file, or a single
``*.safetensors`` / ``*.pth`` file.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Mapping

import huggingface_hub
import torch
from safetensors import safe_open
from torch import Tensor

from common.paths import hub_offline

logger = logging.getLogger(__name__)

StateDict = dict[str, Tensor]

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def resolve_source(source: str | os.PathLike) -> Path:
    """A local path as is; a URL downloaded once into ``$TORCH_HOME/hub/checkpoints``; a hub id as a snapshot dir."""
    text = os.path.expanduser(str(source))
    if os.path.exists(text):
        return Path(text)
    if text.startswith(("http://", "https://")):
        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(text.split("?")[0])
        if target.exists():
            return target
        if hub_offline():
            raise FileNotFoundError(
                f"{text} is not in the download cache ({target}) and HF_HUB_OFFLINE is set; "
                "download it elsewhere and pass the local path"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s -> %s", text, target)
        torch.hub.download_url_to_file(text, str(target), progress=True)  # writes a temp file, then renames
        return target
    if HUB_ID.match(text) and not text.endswith((".pth", ".pt", ".bin", ".safetensors", ".json")):
        repo_id, _, revision = text.partition("@")
        try:
            return Path(
                huggingface_hub.snapshot_download(
                    repo_id,
                    revision=revision or None,
                    allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
                )
            )
        except Exception as err:  # offline without cache, unknown repo, no network ...
            raise FileNotFoundError(
                f"cannot get Hugging Face hub checkpoint {text!r} ({type(err).__name__}: {err}); "
                "pass a local directory or file instead"
            ) from err
    raise FileNotFoundError(
        f"checkpoint source {str(source)!r} is neither an existing file/directory, an http(s) URL, "
        "nor a Hugging Face hub id like 'Salesforce/blip2-opt-2.7b'"
    )


def torch_file_state(path: Path) -> Mapping[str, Tensor]:
    """The state dict of a ``torch.save`` file, memory-mapped where the format allows (tensors read on use)."""
    try:
        try:  # mmap: tensors that are never selected are never read from disk
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err) and "zipfile" not in str(err):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as err:
        raise ValueError(
            f"cannot read checkpoint {path} with torch.load(weights_only=True) ({err}); arbitrary pickles are "
            "refused for safety: re-save it as a plain state dict or safetensors"
        ) from err
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]  # LAVIS / our runner checkpoints: {"model": sd, "optimizer": ..., ...}
    elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict (name -> tensor), nor one under 'model'")
    return obj


def load_file(path: Path, select: Callable[[str], bool] | None = None) -> StateDict:
    """One weight file; ``select(name)`` keeps a subset without reading the rest (safetensors / mmap)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys() if select is None or select(k)}
    return {k: v for k, v in torch_file_state(path).items() if select is None or select(k)}


def file_keys(path: Path) -> list[str]:
    """Tensor names of one weight file, without reading the tensors."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return list(handle.keys())
    return list(torch_file_state(path))


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint: the file itself, or a directory's HF shards, single HF file, or one
    ``*.safetensors`` / ``*.pth`` file."""
    if path.is_file():
        return [path]
    for index_name in HF_INDEX_FILES:
        index = path / index_name
        if index.exists():
            return [path / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    for name in HF_WEIGHT_FILES:
        if (path / name).exists():
            return [path / name]
    candidates = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.pth"))
    if len(candidates) == 1:
        return candidates
    raise FileNotFoundError(
        f"no weights in directory {path}: expected one of {HF_INDEX_FILES + HF_WEIGHT_FILES} "
        f"or a single *.safetensors / *.pth file (found {[p.name for p in candidates]})"
    )


def read_state_dict(source: str | os.PathLike, select: Callable[[str], bool] | None = None) -> StateDict:
    """Raw tensors of a checkpoint (no renaming); a directory may hold HF shards, one file, or ``*.safetensors``.
    ``select(name) -> bool`` reads only part of it (e.g. the vision tower of a full BLIP-2 checkpoint)."""
    state: StateDict = {}
    for file in weight_files(resolve_source(source)):
        state.update(load_file(file, select))
    return state
