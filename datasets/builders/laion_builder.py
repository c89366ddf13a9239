"""LAION (or any webdataset tar shards of image + caption): a streaming training set.

Config keys: ``build_info.storage`` (shard pattern(s) with ``{000..099}`` ranges, a list, or
``::``-joined), ``resampled`` (default true: infinite, shards drawn with replacement),
``shuffle_buffer``, ``seed``, ``text_field`` (json key holding the caption), ``samples_per_epoch``
(fixed per-rank length; needed for equal batches across ranks without resampling).
"""
from __future__ import annotations

import os

from torch.utils.data import Dataset

import registry
from datasets.builders.base_builder import BaseDatasetBuilder, DatasetBuildError, _as_list
from datasets.webdataset_stream import WebDatasetStream, expand_shards


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


@registry.builders.register("laion")
class LaionBuilder(BaseDatasetBuilder):
    DATASET_CONFIG_DICT = {"default": "laion.yaml"}
    download_name = None  # LAION is obtained with img2dataset; see datasets/download.py
    EXTRA_CONFIG_KEYS = (
        "cache_root", "bad_media_policy", "resampled", "shuffle_buffer", "seed", "text_field",
        "caption_choice", "samples_per_epoch",
    )

    def shard_urls(self) -> list[str]:
        patterns = _as_list(self.config.build_info.get("storage"))
        if not patterns:
            raise KeyError("laion: build_info.storage (tar shard pattern) is not set")
        shards = []
        for pattern in patterns:
            pattern = str(pattern)
            shards.extend(expand_shards(pattern if _is_remote(pattern) else self.resolve_path(pattern)))
        missing = [s for s in shards if not _is_remote(s) and not os.path.isfile(s)]
        if missing:
            raise DatasetBuildError(
                f"laion: {len(missing)} of {len(shards)} shard(s) not found, first: {missing[0]}. "
                "Check build_info.storage (relative paths are under cache_root="
                f"{self.cache_root}); shards are made with img2dataset --output_format webdataset."
            )
        return shards

    def build_datasets(self) -> dict[str, Dataset]:
        shards = self.shard_urls()
        procs = self.build_processors()
        cfg = self.config
        spe = cfg.get("samples_per_epoch")
        stream = WebDatasetStream(
            shards,
            procs["vis_train"],
            procs["text_train"],
            resampled=bool(cfg.get("resampled", True)),
            shuffle_buffer=int(cfg.get("shuffle_buffer", 1000)),
            seed=int(cfg.get("seed", 0)),
            text_field=str(cfg.get("text_field", "caption")),
            caption_choice=str(cfg.get("caption_choice", "first")),
            bad_media_policy=str(cfg.get("bad_media_policy", "skip")),
            samples_per_epoch=int(spe) if spe is not None else None,
        )
        return {"train": stream}
