"""Reading images and video frames from disk; every failure becomes ``BadMediaError`` naming the file.

decord is imported only inside ``load_video_frames`` so image-only use never needs it.
"""
from __future__ import annotations

import io
import logging
import os
import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from processors.image import ImageLoadError, load_image as load_rgb, to_rgb

FRAME_SAMPLING = ("uniform", "random", "headtail")
#: bad files are logged one by one up to this count, then every LOG_EVERY-th (web-scale sets have many dead links)
LOG_FIRST, LOG_EVERY = 20, 1000


class BadMediaError(RuntimeError):
    """A media file is missing, truncated or not decodable. ``path`` names it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot read {path}: {reason}")
        self.path = path


def report_bad_media(logger: logging.Logger, owner: str, error: Exception, count: int) -> None:
    """Warn about the ``count``-th unreadable file of ``owner`` (all of the first few, then sparsely)."""
    if count <= LOG_FIRST or count % LOG_EVERY == 0:
        logger.warning("%s: skipped unreadable media (%s); %d skipped so far in this process", owner, error, count)


def load_image(path: str) -> Image.Image:
    """Open ``path`` as a fully decoded RGB PIL image (truncation is detected here, not later).

    Decoding and mode conversion (transparency, 16-bit grey, CMYK) are the processors' one loader.
    """
    if not os.path.isfile(path):
        raise BadMediaError(path, "file does not exist")
    try:
        return load_rgb(path)
    except ImageLoadError as e:
        raise BadMediaError(path, str(e)) from e


def decode_image_bytes(data: bytes, name: str) -> Image.Image:
    """Decode encoded image bytes (e.g. a webdataset member) to RGB; ``name`` is used in errors."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadMediaError(name, f"not a readable image ({type(e).__name__}: {e})") from e


def sample_frame_indices(
    num_frames: int, n_frms: int, sampling: str = "uniform", rng: random.Random | None = None
) -> list[int]:
    """Pick ``n_frms`` frame indices out of ``num_frames``.

    ``uniform``: the middle frame of each of ``n_frms`` equal segments (deterministic).
    ``random``: one random frame inside each segment (temporal jitter for training).
    ``headtail``: random frames from the first and second half alternately.
    Shorter videos repeat frames so the result always has ``n_frms`` entries.
    """
    if num_frames <= 0:
        raise ValueError(f"video has no frames (num_frames={num_frames})")
    if n_frms <= 0:
        raise ValueError(f"n_frms must be positive, got {n_frms}")
    if sampling not in FRAME_SAMPLING:
        raise ValueError(f"frame sampling {sampling!r} unknown; expected one of {FRAME_SAMPLING}")
    rng = rng or random.Random(0)
    edges = np.linspace(0, num_frames, n_frms + 1)
    if sampling == "uniform":
        return [min(int((edges[i] + edges[i + 1]) / 2), num_frames - 1) for i in range(n_frms)]
    if sampling == "random":
        out = []
        for i in range(n_frms):
            lo, hi = int(edges[i]), max(int(edges[i + 1]), int(edges[i]) + 1)
            out.append(min(rng.randrange(lo, hi), num_frames - 1))
        return out
    half = max(num_frames // 2, 1)
    head = sorted(rng.randrange(0, half) for _ in range((n_frms + 1) // 2))
    tail = sorted(rng.randrange(min(half, num_frames - 1), num_frames) for _ in range(n_frms // 2))
    return head + tail


def load_video_frames(
    path: str, n_frms: int, sampling: str = "uniform", rng: random.Random | None = None
) -> list[Image.Image]:
    """Read ``n_frms`` frames of a video with decord, returned as RGB PIL images."""
    try:
        import decord  # decord: optional (the video extra), only for videos
    except ImportError as e:
        raise ImportError(
            "reading videos needs decord: pip install decord (or the 'video' extra: pip install -e .[video])"
        ) from e
    if not os.path.isfile(path):
        raise BadMediaError(path, "file does not exist")
    try:
        reader = decord.VideoReader(path, num_threads=1)
        indices = sample_frame_indices(len(reader), n_frms, sampling, rng)
        frames = reader.get_batch(indices).asnumpy()  # [T, H, W, 3] uint8
    except (decord.DECORDError, RuntimeError, ValueError, OSError) as e:
        raise BadMediaError(path, f"not a readable video ({type(e).__name__}: {e})") from e
    return [Image.fromarray(f) for f in frames]


def stack_frames(frames: Sequence) -> "torch.Tensor":  # noqa: F821
    """Stack per-frame tensors [3,H,W] into a clip tensor [3,T,H,W] (the video layout of a sample)."""
    return torch.stack(list(frames), dim=1)
