"""Caption builders: COCO Karpathy captions and NoCaps (evaluation only)."""
from __future__ import annotations

import registry
from datasets.builders.base_builder import BaseDatasetBuilder
from datasets.caption_datasets import CaptionDataset, CaptionEvalDataset, NoCapsEvalDataset


@registry.builders.register("coco_caption")
class COCOCaptionBuilder(BaseDatasetBuilder):
    """COCO Karpathy splits: train one caption per record, val/test five captions per image."""

    train_dataset_cls = CaptionDataset
    eval_dataset_cls = CaptionEvalDataset
    DATASET_CONFIG_DICT = {"default": "coco_caption.yaml"}
    download_name = "coco"


@registry.builders.register("nocaps")
class NoCapsBuilder(BaseDatasetBuilder):
    """NoCaps val/test (zero-shot caption evaluation of COCO-finetuned models)."""

    train_dataset_cls = None
    eval_dataset_cls = NoCapsEvalDataset
    DATASET_CONFIG_DICT = {"default": "nocaps.yaml"}
    download_name = "nocaps"

    def dataset_kwargs(self, split: str, is_train: bool) -> dict:
        """The official image info (``build_info.annotations.<split>.domains``), for in/near/out-domain scores."""
        kwargs = super().dataset_kwargs(split, is_train)
        domain_file = self.extra_file(split, "domains")
        if domain_file is not None:
            kwargs["domain_file"] = domain_file
        return kwargs
