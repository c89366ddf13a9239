"""A disk cache of the frozen image encoder's output, so later epochs skip the ViT.

Valid only when the encoder is frozen AND image preprocessing is deterministic (eval-style resize,
no random crop/flip/RandAugment): entries are keyed by a hash of the preprocessed image tensor, so
with random augmentation every lookup misses (results stay correct, nothing is saved).
Entries live in memory-mapped ``.npy`` chunks under ``root/<fingerprint>/rank<r>/``; the
fingerprint covers the encoder class, its weights (sampled), the image size and the dtype, so a
changed encoder, size or checkpoint gets a fresh directory instead of stale features.
``keys.txt`` holds one line per row: the image key and a digest of the row's bytes. A row whose bytes
no longer match (a damaged or truncated chunk) is recomputed by the encoder and rewritten, with a
warning naming the chunk: a damaged cache costs time, never correctness.
One process at a time writes a cache directory: it holds an exclusive lock (``flock`` on ``lock``, released when
the process ends, however it ends); a job started meanwhile with the same encoder gets ``FeatureCacheBusy`` (the
model then runs its encoder on every batch instead). Two writers would append different images to the same rows.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import IO, Callable

import numpy as np
import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

ROWS_PER_CHUNK = 256
_NUMPY_DTYPES = {torch.float32: np.float32, torch.bfloat16: np.uint16, torch.float16: np.float16}
_HELD: dict[Path, tuple[IO[str], int]] = {}  # cache directories this process has locked: (lock file, open caches)


class FeatureCacheBusy(RuntimeError):
    """Another process holds the cache directory's lock."""


def _lock(directory: Path) -> None:
    """Lock ``directory`` for this process (shared by the caches it opens there), or raise FeatureCacheBusy."""
    if directory in _HELD:
        handle, users = _HELD[directory]
        _HELD[directory] = (handle, users + 1)
        return
    handle = open(directory / "lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise FeatureCacheBusy(f"feature cache {directory} is in use by process {holder} (another job with the same "
                               f"frozen encoder); set run.feature_cache_dir to another directory to cache this job's "
                               f"features too") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _HELD[directory] = (handle, 1)


def _unlock(directory: Path) -> None:
    handle, users = _HELD[directory]
    if users > 1:
        _HELD[directory] = (handle, users - 1)
    else:
        del _HELD[directory]
        handle.close()  # releases the flock


def encoder_fingerprint(encoder: nn.Module, image_size: int, extra: str = "") -> str:
    """A short hash of what determines the encoder's output: class, output width (e.g. appended position
    channels), weights, image size, dtype."""
    width = getattr(encoder, "num_features", "")
    digest = hashlib.sha256(f"{type(encoder).__qualname__}|{width}|{image_size}|{extra}".encode())
    for name, value in encoder.state_dict().items():
        # a quantised layer's entries: its packed (int8 weight, bias) pair and its dtype besides tensors
        for tensor in value if isinstance(value, tuple) else (value,):
            if not isinstance(tensor, Tensor):
                digest.update(f"{name}|{tensor}".encode())
                continue
            flat = (tensor.int_repr() if tensor.is_quantized else tensor).detach().reshape(-1)
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
        self.dir = Path(root).expanduser().resolve() / fingerprint / f"rank{rank}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._chunks: dict[int, np.memmap] = {}
        _lock(self.dir)
        self._locked = True
        self._keys_file = self.dir / "keys.txt"
        lines = self._keys_file.read_text().splitlines() if self._keys_file.exists() else []
        entries = [line.split() for line in lines]
        self._rows = {entry[0]: row for row, entry in enumerate(entries) if entry}
        self._digests = {row: entry[1] for row, entry in enumerate(entries) if len(entry) > 1}
        meta = self.dir / "meta.json"
        self._meta = json.loads(meta.read_text()) if meta.exists() else None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def close(self) -> None:
        """Release this cache's share of the directory lock (also on garbage collection)."""
        if getattr(self, "_locked", False):
            self._locked = False
            self._chunks.clear()
            _unlock(self.dir)

    def __del__(self) -> None:
        self.close()

    # -- storage ---------------------------------------------------------------------------------------------------
    def _chunk(self, index: int, create: bool) -> np.memmap:
        if index not in self._chunks:
            path = self.dir / f"chunk{index:05d}.npy"
            if path.exists():
                try:
                    _check_complete(path, (ROWS_PER_CHUNK, *self._meta["shape"]))
                    chunk = np.load(path, mmap_mode="r+")
                except (ValueError, OSError, EOFError) as err:
                    logger.warning("feature cache chunk %s is damaged (%s): its rows are recomputed", path, err)
                    path.unlink()
                    return self._chunk(index, create)
                self._chunks[index] = chunk
            elif create:
                shape = (ROWS_PER_CHUNK, *self._meta["shape"])
                self._chunks[index] = np.lib.format.open_memmap(
                    path, mode="w+", dtype=np.dtype(self._meta["numpy_dtype"]), shape=shape
                )
            else:
                raise FileNotFoundError(f"feature cache chunk {path} is missing; delete {self.dir} to rebuild")
        return self._chunks[index]

    def _read(self, row: int) -> Tensor | None:
        """The stored row, or None when its chunk is gone or its bytes do not match their digest."""
        try:
            array = np.array(self._chunk(row // ROWS_PER_CHUNK, create=False)[row % ROWS_PER_CHUNK])
        except FileNotFoundError:
            return None
        if self._digests.get(row) != _digest(array):
            logger.warning("feature cache %s: row %d of chunk%05d.npy does not match its digest: recomputed",
                           self.dir, row % ROWS_PER_CHUNK, row // ROWS_PER_CHUNK)
            return None
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
        known = key in self._rows
        row = self._rows[key] if known else len(self._rows)
        array = features.detach().cpu()
        array = (array.view(torch.uint16) if array.dtype == torch.bfloat16 else array).numpy()
        chunk = self._chunk(row // ROWS_PER_CHUNK, create=True)
        chunk[row % ROWS_PER_CHUNK] = array
        chunk.flush()
        self._digests[row] = _digest(array)
        self._rows[key] = row
        if known:  # a recomputed row: rewrite the key file with its new digest
            lines = sorted(self._rows.items(), key=lambda item: item[1])
            tmp = self._keys_file.with_suffix(".tmp")
            tmp.write_text("".join(f"{k} {self._digests.get(r, '')}\n" for k, r in lines))
            os.replace(tmp, self._keys_file)
        else:
            with open(self._keys_file, "a") as handle:
                handle.write(f"{key} {self._digests[row]}\n")

    # -- lookup ----------------------------------------------------------------------------------------------------
    def features(self, images: Tensor, encode: Callable[[Tensor], Tensor]) -> Tensor:
        """Encoder features [B, N, W] for images [B, 3, S, S]; `encode` runs only on the misses."""
        keys = [image_key(image) for image in images]
        stored = {i: self._read(self._rows[key]) for i, key in enumerate(keys) if key in self._rows}
        found = {i: row for i, row in stored.items() if row is not None}
        missing = [i for i in range(len(keys)) if i not in found]
        if missing:
            fresh = encode(images[missing])  # [M, N, W]
            written = set()
            for j, i in enumerate(missing):
                if keys[i] not in written:  # the same image twice in one batch
                    self._write(keys[i], fresh[j])
                    written.add(keys[i])
                found[i] = fresh[j]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack([found[i] for i in range(len(keys))]).to(images.device)


def _check_complete(path: Path, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless the .npy file holds the whole array (np.load in r+ mode would silently pad a
    truncated file with zeros)."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        found, _, dtype = read_header(fh)
        expected = fh.tell() + int(np.prod(found)) * dtype.itemsize
    if tuple(found) != tuple(shape):
        raise ValueError(f"shape {tuple(found)}, expected {tuple(shape)}")
    size = path.stat().st_size
    if size < expected:
        raise ValueError(f"{size} bytes, expected {expected}: truncated")


def _digest(array: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=8).hexdigest()
