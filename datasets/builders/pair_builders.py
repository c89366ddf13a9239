"""Image-text pair builders for pre-training: Visual Genome captions, CC3M, CC12M, SBU."""
from __future__ import annotations

import registry
from datasets.builders.base_builder import BaseDatasetBuilder
from datasets.caption_datasets import CaptionEvalDataset, ImageTextPairDataset


class ImageTextPairBuilderBase(BaseDatasetBuilder):
    train_dataset_cls = ImageTextPairDataset
    eval_dataset_cls = CaptionEvalDataset


@registry.builders.register("vg_caption")
class VGCaptionBuilder(ImageTextPairBuilderBase):
    DATASET_CONFIG_DICT = {"default": "vg_caption.yaml"}
    download_name = "vg"


@registry.builders.register("conceptual_caption_3m")
class ConceptualCaption3MBuilder(ImageTextPairBuilderBase):
    DATASET_CONFIG_DICT = {"default": "conceptual_caption_3m.yaml"}
    download_name = "cc3m"


@registry.builders.register("conceptual_caption_12m")
class ConceptualCaption12MBuilder(ImageTextPairBuilderBase):
    DATASET_CONFIG_DICT = {"default": "conceptual_caption_12m.yaml"}
    download_name = "cc12m"


@registry.builders.register("sbu_caption")
class SBUCaptionBuilder(ImageTextPairBuilderBase):
    DATASET_CONFIG_DICT = {"default": "sbu_caption.yaml"}
    download_name = "sbu"
