"""Video caption and QA datasets (MSR-VTT layout), frames read with decord (imported lazily).

The sampled frames go through the configured *image* processor one by one, with the same random
augmentation parameters for all frames of a clip, and are stacked to ``image`` [3, T, H, W]
(batched: [B, 3, T, H, W]). ``frame_sampling`` is ``uniform`` (eval
default) or ``random`` (train default); random draws are seeded by (seed, epoch, index) so a
resumed run reads the same frames.
"""
from __future__ import annotations

import random
from typing import Any

import torch

from datasets.caption_datasets import CaptionDataset, CaptionEvalDataset
from datasets.media import FRAME_SAMPLING, load_video_frames
from datasets.vqa_datasets import VQADataset, VQAEvalDataset


class VideoMixin:
    """Turns a media path into a processed clip of ``n_frms`` frames."""

    n_frms: int
    frame_sampling: str
    seed: int
    epoch: int

    def __init__(
        self, *args: Any, n_frms: int = 4, frame_sampling: str | None = None, seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)  # the dataset class that follows in the MRO
        if frame_sampling is None:
            frame_sampling = "random" if self.is_train else "uniform"  # type: ignore[attr-defined]
        if frame_sampling not in FRAME_SAMPLING:
            raise ValueError(f"frame_sampling={frame_sampling!r}; expected one of {FRAME_SAMPLING}")
        self.n_frms, self.frame_sampling, self.seed, self.epoch = int(n_frms), frame_sampling, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Vary the random frame draws per epoch (deterministically)."""
        self.epoch = int(epoch)

    def _process_frame(self, frame: Any, aug_seed: int) -> Any:
        """Apply the image processor with the same random draws for every frame of a clip
        (one crop/flip per clip, not per frame); the caller's RNG states are left untouched."""
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(aug_seed)
                random.seed(aug_seed)
                return self.vis_processor(frame)  # type: ignore[attr-defined]
        finally:
            random.setstate(py_state)

    def _load(self, index: int) -> Any:
        path = self.media_path(self.annotation[index])  # type: ignore[attr-defined]
        rng = random.Random((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index)
        frames = load_video_frames(path, self.n_frms, self.frame_sampling, rng)
        aug_seed = rng.randrange(1 << 62)
        processed = [self._process_frame(f, aug_seed) for f in frames]
        if all(isinstance(p, torch.Tensor) for p in processed):
            return torch.stack(processed, dim=1)  # [3, T, H, W]
        return processed


_VIDEO_FIELDS = {"image": "video"}


class VideoCaptionDataset(VideoMixin, CaptionDataset):
    """``{"video", "caption"}`` -> ``{"image": [3,T,H,W], "text_input", "image_id", "instance_id"}``."""

    default_fields = {**CaptionDataset.default_fields, **_VIDEO_FIELDS}


class VideoCaptionEvalDataset(VideoMixin, CaptionEvalDataset):
    """One sample per video with an int ``image_id`` and COCO-format ground truth."""

    default_fields = {**CaptionEvalDataset.default_fields, **_VIDEO_FIELDS}


class VideoQADataset(VideoMixin, VQADataset):
    """``{"video", "question", "answer"}`` -> VQA training sample with a clip as ``image``."""

    default_fields = {**VQADataset.default_fields, **_VIDEO_FIELDS}


class VideoQAEvalDataset(VideoMixin, VQAEvalDataset):
    """VQA eval sample with a clip; ``answer_list`` from MSR-VTT's ``ans2label`` file."""

    default_fields = {**VQAEvalDataset.default_fields, **_VIDEO_FIELDS}
