"""Generic builders for a user's own data, configured by YAML only (no Python needed).

``image_text_pairs``: records with an image path and a caption (string or list); train samples
serve pre-training, captioning and retrieval training. ``eval_format`` chooses the eval side:
``caption`` (one sample per image + COCO ground truth) or ``retrieval`` (text/img maps).
``vqa_custom``: records with image, question, answer(s) and optionally question_id.
Field names are set with ``fields:``, e.g. ``fields: {image: file_name, caption: text}``.
"""
from __future__ import annotations

from typing import Any

import registry
from datasets.builders.base_builder import BaseDatasetBuilder
from datasets.builders.vqa_builders import VQABuilderBase
from datasets.caption_datasets import CaptionEvalDataset, ImageTextPairDataset
from datasets.retrieval_datasets import RetrievalEvalDataset
from datasets.vqa_datasets import VQADataset, VQAEvalDataset

EVAL_FORMATS = {"caption": CaptionEvalDataset, "retrieval": RetrievalEvalDataset}


@registry.builders.register("image_text_pairs")
class ImageTextPairsBuilder(BaseDatasetBuilder):
    train_dataset_cls = ImageTextPairDataset
    eval_dataset_cls = CaptionEvalDataset
    DATASET_CONFIG_DICT = {"default": "image_text_pairs.yaml"}
    EXTRA_CONFIG_KEYS = (*BaseDatasetBuilder.EXTRA_CONFIG_KEYS, "eval_format")

    def __init__(self, cfg: Any = None) -> None:
        super().__init__(cfg)
        fmt = self.config.get("eval_format", "caption")
        if fmt not in EVAL_FORMATS:
            raise ValueError(f"image_text_pairs: eval_format {fmt!r}; expected one of {sorted(EVAL_FORMATS)}")
        self.eval_dataset_cls = EVAL_FORMATS[fmt]

    def dataset_kwargs(self, split: str, is_train: bool) -> dict[str, Any]:
        kwargs = super().dataset_kwargs(split, is_train)
        if not is_train and self.eval_dataset_cls is RetrievalEvalDataset and "fields" in kwargs:
            kwargs["fields"] = {k: v for k, v in kwargs["fields"].items() if k in ("image", "caption")}
        return kwargs


@registry.builders.register("vqa_custom")
class CustomVQABuilder(VQABuilderBase):
    train_dataset_cls = VQADataset
    eval_dataset_cls = VQAEvalDataset
    DATASET_CONFIG_DICT = {"default": "vqa_custom.yaml"}
