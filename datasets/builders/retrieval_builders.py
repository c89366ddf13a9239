"""Retrieval builders: COCO and Flickr30k (Karpathy splits)."""
from __future__ import annotations

import registry
from datasets.builders.base_builder import BaseDatasetBuilder
from datasets.retrieval_datasets import RetrievalDataset, RetrievalEvalDataset


@registry.builders.register("coco_retrieval")
class COCORetrievalBuilder(BaseDatasetBuilder):
    train_dataset_cls = RetrievalDataset
    eval_dataset_cls = RetrievalEvalDataset
    DATASET_CONFIG_DICT = {"default": "coco_retrieval.yaml"}
    download_name = "coco"


@registry.builders.register("flickr30k")
class Flickr30kBuilder(BaseDatasetBuilder):
    train_dataset_cls = RetrievalDataset
    eval_dataset_cls = RetrievalEvalDataset
    DATASET_CONFIG_DICT = {"default": "flickr30k.yaml"}
    download_name = "flickr30k"
