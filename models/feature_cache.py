"""A disk cache of the frozen image encoder's output, so later epochs skip the ViT.

Valid only when the encoder is frozen AND image preprocessing is deterministic (eval-style resize,
no random crop/flip/RandAugment): entries are keyed by a hash of the preprocessed image tensor, so
with random augmentation every lookup misses (results stay correct, nothing is saved).
Entries live in memory-mapped ``.npy`` chunks under ``root/<fingerprint>/rank<r>/``; the
fingerprint covers the encoder class, its weights (sampled), the image size and the dtype, so a
changed encoder, size or checkpoint gets a fresh directory instead of stale features.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

ROWS_PER_CHUNK = 256
_NUMPY_DTYPES = {torch.float32: np.float32, torch.bfloat16: np.uint16, torch.float16: np.float16}


def encoder_fingerprint(encoder: nn.Module, image_size: int, extra: str = "") -> str:
    """A short hash of what determines the encoder's output: class, output width (e.g. appended position
    channels), weights, image size, dtype."""
    width = getattr(encoder, "num_features", "")
    digest = hashlib.sha256(f"{type(encoder).__qualname__}|{width}|{image_size}|{extra}".encode())
    for name, tensor in encoder.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def image_key(image: Tensor) -> str:
    """Hash of one preprocessed image [3, S, S] (shape included)."""
    data = image.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.blake2b(data.tobytes() + str(data.shape).encode(), digest_size=16).hexdigest()


class FrozenFeatureCache:
    """Maps preprocessed images to stored encoder features [N, W], computing only the misses."""

    def __init__(self, root: str | os.PathLike, fingerprint: str, rank: int = 0) -> None:
        self.dir = Path(root).expanduser() / fingerprint / f"rank{rank}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._keys_file = self.dir / "keys.txt"
        keys = self._keys_file.read_text().split() if self._keys_file.exists() else []
        self._rows = {key: row for row, key in enumerate(keys)}
        meta = self.dir / "meta.json"
        self._meta = json.loads(meta.read_text()) if meta.exists() else None
        self._chunks: dict[int, np.memmap] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    # -- storage ---------------------------------------------------------------------------------------------------
    def _chunk(self, index: int, create: bool) -> np.memmap:
        if index not in self._chunks:
            path = self.dir / f"chunk{index:05d}.npy"
            if path.exists():
                self._chunks[index] = np.load(path, mmap_mode="r+")
            elif create:
                shape = (ROWS_PER_CHUNK, *self._meta["shape"])
                self._chunks[index] = np.lib.format.open_memmap(
                    path, mode="w+", dtype=np.dtype(self._meta["numpy_dtype"]), shape=shape
                )
            else:
                raise FileNotFoundError(f"feature cache chunk {path} is missing; delete {self.dir} to rebuild")
        return self._chunks[index]

    def _read(self, row: int) -> Tensor:
        array = np.array(self._chunk(row // ROWS_PER_CHUNK, create=False)[row % ROWS_PER_CHUNK])
        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if self._meta["torch_dtype"] == "bfloat16" else tensor

    def _write(self, key: str, features: Tensor) -> None:
        if self._meta is None:
            torch_dtype = features.dtype
            self._meta = {"shape": list(features.shape), "torch_dtype": str(torch_dtype).removeprefix("torch."),
                          "numpy_dtype": np.dtype(_NUMPY_DTYPES[torch_dtype]).str}
            (self.dir / "meta.json").write_text(json.dumps(self._meta))
        if list(features.shape) != self._meta["shape"]:
            raise ValueError(f"feature cache {self.dir}: features of shape {list(features.shape)} "
                             f"do not match the cached shape {self._meta['shape']}")
        row = len(self._rows)
        array = features.detach().cpu()
        array = array.view(torch.uint16) if array.dtype == torch.bfloat16 else array
        chunk = self._chunk(row // ROWS_PER_CHUNK, create=True)
        chunk[row % ROWS_PER_CHUNK] = array.numpy()
        chunk.flush()
        with open(self._keys_file, "a") as handle:
            handle.write(key + "\n")
        self._rows[key] = row

    # -- lookup ----------------------------------------------------------------------------------------------------
    def features(self, images: Tensor, encode: Callable[[Tensor], Tensor]) -> Tensor:
        """Encoder features [B, N, W] for images [B, 3, S, S]; `encode` runs only on the misses."""
        keys = [image_key(image) for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self._rows]
        computed = {}
        if missing:
            fresh = encode(images[missing])  # [M, N, W]
            for j, i in enumerate(missing):
                if keys[i] not in self._rows:  # the same image twice in one batch
                    self._write(keys[i], fresh[j])
                computed[i] = fresh[j]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        rows = [computed[i] if i in computed else self._read(self._rows[key]) for i, key in enumerate(keys)]
        return torch.stack(rows).to(images.device)
