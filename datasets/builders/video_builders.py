"""Video builders: MSR-VTT captioning and QA (frames read with decord, imported lazily).

Extra config keys: ``n_frms`` (frames per clip, default 4) and ``frame_sampling``
(``{train: random, eval: uniform}`` by default, or one string for both).
"""
from __future__ import annotations

from typing import Any

import registry
from datasets.builders.base_builder import BaseDatasetBuilder
from datasets.builders.vqa_builders import VQABuilderBase
from datasets.video_datasets import (
    VideoCaptionDataset,
    VideoCaptionEvalDataset,
    VideoQADataset,
    VideoQAEvalDataset,
)


class VideoBuilderMixin:
    config: Any
    EXTRA_CONFIG_KEYS = (*BaseDatasetBuilder.EXTRA_CONFIG_KEYS, "n_frms", "frame_sampling", "seed")

    def video_kwargs(self, is_train: bool) -> dict[str, Any]:
        sampling = self.config.get("frame_sampling")
        if sampling is not None and not isinstance(sampling, str):
            sampling = sampling.get("train" if is_train else "eval")
        return {
            "n_frms": int(self.config.get("n_frms", 4)),
            "frame_sampling": sampling,
            "seed": int(self.config.get("seed", 0)),
        }


@registry.builders.register("msrvtt_caption")
class MSRVTTCaptionBuilder(VideoBuilderMixin, BaseDatasetBuilder):
    train_dataset_cls = VideoCaptionDataset
    eval_dataset_cls = VideoCaptionEvalDataset
    DATASET_CONFIG_DICT = {"default": "msrvtt_caption.yaml"}
    download_name = "msrvtt"

    def dataset_kwargs(self, split: str, is_train: bool) -> dict[str, Any]:
        return {**super().dataset_kwargs(split, is_train), **self.video_kwargs(is_train)}


@registry.builders.register("msrvtt_qa")
class MSRVTTQABuilder(VideoBuilderMixin, VQABuilderBase):
    train_dataset_cls = VideoQADataset
    eval_dataset_cls = VideoQAEvalDataset
    DATASET_CONFIG_DICT = {"default": "msrvtt_qa.yaml"}
    download_name = "msrvtt"

    def dataset_kwargs(self, split: str, is_train: bool) -> dict[str, Any]:
        return {**super().dataset_kwargs(split, is_train), **self.video_kwargs(is_train)}
