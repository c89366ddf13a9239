"""VQA builders: VQAv2 (``coco_vqa``), OK-VQA and GQA.

Eval splits may name extra files next to ``storage``: ``answer_list`` (candidate answers for
ranking), ``question_file`` and ``annotation_file`` (official COCO-format files for the VQA
evaluation); each is ``{url, storage}``.
"""
from __future__ import annotations

from typing import Any

import registry
from datasets.builders.base_builder import BaseDatasetBuilder
from datasets.vqa_datasets import GQADataset, GQAEvalDataset, VQADataset, VQAEvalDataset


class VQABuilderBase(BaseDatasetBuilder):
    """Adds the answer list and the COCO-format question/annotation files to eval datasets."""

    def dataset_kwargs(self, split: str, is_train: bool) -> dict[str, Any]:
        kwargs = super().dataset_kwargs(split, is_train)
        if not is_train:
            kwargs.update(
                answer_list_path=self.extra_file(split, "answer_list"),
                coco_question_file=self.extra_file(split, "question_file"),
                coco_annotation_file=self.extra_file(split, "annotation_file"),
            )
        return kwargs


@registry.builders.register("coco_vqa")
class COCOVQABuilder(VQABuilderBase):
    train_dataset_cls = VQADataset
    eval_dataset_cls = VQAEvalDataset
    DATASET_CONFIG_DICT = {"default": "coco_vqa.yaml", "eval": "coco_vqa_eval.yaml"}
    download_name = "vqav2"


@registry.builders.register("ok_vqa")
class OKVQABuilder(VQABuilderBase):
    train_dataset_cls = VQADataset
    eval_dataset_cls = VQAEvalDataset
    DATASET_CONFIG_DICT = {"default": "ok_vqa.yaml"}
    download_name = "okvqa"


@registry.builders.register("gqa")
class GQABuilder(VQABuilderBase):
    train_dataset_cls = GQADataset
    eval_dataset_cls = GQAEvalDataset
    DATASET_CONFIG_DICT = {
        "default": "gqa.yaml",
        "balanced_val": "gqa_balanced_val.yaml",
        "balanced_testdev": "gqa_balanced_testdev.yaml",
    }
    download_name = "gqa"
