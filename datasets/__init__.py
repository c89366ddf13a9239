"""Datasets for BLIP-2: annotation loading, dataset classes, the collater, multi-dataset mixing,
builders (registered in ``registry.builders``) and download helpers (``python -m datasets.download``).

Importing this package registers every builder; decord and webdataset are imported only when a
video is read or a shard is streamed.
"""
from datasets.base_dataset import BaseDataset, collate_samples
from datasets.mixing import ConcatDataset, MixtureDataset, MixtureIterableDataset, combine_datasets
from datasets.webdataset_stream import WebDatasetStream, expand_braces, expand_shards
from datasets import builders  # noqa: E402,F401  (registers the builders)

__all__ = [
    "BaseDataset",
    "collate_samples",
    "ConcatDataset",
    "MixtureDataset",
    "MixtureIterableDataset",
    "combine_datasets",
    "WebDatasetStream",
    "expand_braces",
    "expand_shards",
]
