"""The dataset builder: default YAML + project overrides -> {split: Dataset} with processors.

Config node (what ``datasets.<name>`` holds in a project YAML, merged over the default YAML)::

    data_type: images                      # images | videos
    cache_root: ${oc.env:BLIP2_CACHE_ROOT,~/.cache/blip2}   # relative storage paths live here
    build_info:
      annotations:
        train: {url: <str|list>, storage: <str|list>}   # url: where `datasets.download` fetches it
        val:   {url: ..., storage: ...}
      images: {storage: coco/images}      # (videos: {storage: ...} for data_type videos)
    vis_processor:  {train: {name: ..., ...}, eval: {name: ..., ...}}
    text_processor: {train: {name: ...},      eval: {name: ...}}
    splits: [train, val]                  # optional: build only these
    fields: {caption: text}               # optional: annotation field names
    bad_media_policy: skip                # skip (substitute, warn, count) | error

A missing annotation file or media directory fails in ``build_datasets`` before any dataset is
made, naming the path and the download command.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import Dataset

import registry
from common.paths import cache_root, resolve_storage_path

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
SPLITS = ("train", "val", "test")


class DatasetBuildError(FileNotFoundError):
    """Data a builder needs is not on disk (the message says where it should be and how to get it)."""


def load_dataset_config(path: str) -> DictConfig:
    """The single ``datasets.<name>`` node of a dataset YAML."""
    cfg = OmegaConf.load(path)
    node = cfg.get("datasets")
    if not isinstance(node, DictConfig) or len(node) != 1:
        raise ValueError(f"dataset config {path}: expected exactly one entry under `datasets:`")
    return next(iter(node.values()))


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, ListConfig)):
        return list(value)
    return [value]


class BaseDatasetBuilder:
    """Builds the train/val/test datasets of one dataset family from its config node."""

    train_dataset_cls: type[Dataset] | None = None
    eval_dataset_cls: type[Dataset] | None = None
    #: dataset type -> YAML file name under datasets/configs/
    DATASET_CONFIG_DICT: dict[str, str] = {}
    #: name for `python -m datasets.download NAME`; None for a user's own data
    download_name: str | None = None
    #: config keys beyond the standard ones (runners/config.py validates against them)
    EXTRA_CONFIG_KEYS: tuple[str, ...] = ("cache_root", "splits", "fields", "bad_media_policy")

    def __init__(self, cfg: DictConfig | dict | str | None = None) -> None:
        if cfg is None:
            cfg = self.default_config()
        elif isinstance(cfg, str):
            cfg = load_dataset_config(cfg)
        elif isinstance(cfg, dict):
            cfg = OmegaConf.create(cfg)
        if "build_info" not in cfg:
            hint = " (got a whole config file: pass its datasets.<name> node)" if "datasets" in cfg else ""
            raise ValueError(f"{type(self).__name__}: the dataset config has no `build_info`{hint}; keys: {sorted(cfg)}")
        self.config: DictConfig = cfg
        self.data_type: str = cfg.get("data_type", "images")
        if self.data_type not in ("images", "videos"):
            raise ValueError(f"{type(self).__name__}: data_type {self.data_type!r}; expected images or videos")

    # -- config -------------------------------------------------------------------------------
    @classmethod
    def default_config_path(cls, type: str = "default") -> str:  # noqa: A002 (LAVIS/runner name)
        if type not in cls.DATASET_CONFIG_DICT:
            raise KeyError(
                f"{cls.__name__} has no dataset type {type!r}; available: {sorted(cls.DATASET_CONFIG_DICT)}"
            )
        return os.path.join(CONFIG_DIR, cls.DATASET_CONFIG_DICT[type])

    @classmethod
    def default_config(cls, type: str = "default") -> DictConfig:  # noqa: A002
        return load_dataset_config(cls.default_config_path(type))

    @property
    def cache_root(self) -> str:
        return os.path.expanduser(str(self.config.get("cache_root", None) or cache_root()))

    def resolve_path(self, path: str) -> str:
        """Absolute paths as given (after ``~``); relative ones under ``cache_root``."""
        return str(resolve_storage_path(path, self.cache_root))

    def _how_to_get(self, what: str) -> str:
        if self.download_name:
            return f"Download it with: python -m datasets.download {self.download_name} --root {self.cache_root}"
        return f"Check `{what}` in the dataset config (relative paths are under cache_root={self.cache_root})."

    def require_file(self, path: str, what: str, kind: str = "annotation file") -> str:
        """``path`` if it is a file, else a ``DatasetBuildError`` naming it, its config key and the fix."""
        if not os.path.isfile(path):
            raise DatasetBuildError(
                f"{type(self).__name__}: {kind} not found: {path} (from {what}). {self._how_to_get(what)}"
            )
        return path

    def require_dir(self, path: str, what: str, kind: str = "image directory") -> str:
        if not os.path.isdir(path):
            raise DatasetBuildError(
                f"{type(self).__name__}: {kind} not found: {path} (from {what}). {self._how_to_get(what)}"
            )
        return path

    # -- processors ---------------------------------------------------------------------------
    @staticmethod
    def _build_processor(cfg: DictConfig | None) -> Callable | None:
        if cfg is None or cfg.get("name") is None:
            return None
        return registry.processors.get(cfg.name).from_config(cfg)

    def build_processors(self) -> dict[str, Callable | None]:
        """``{"vis_train", "vis_eval", "text_train", "text_eval"}`` from the config (None = identity)."""
        vis = self.config.get("vis_processor") or {}
        text = self.config.get("text_processor") or {}
        return {
            "vis_train": self._build_processor(vis.get("train")),
            "vis_eval": self._build_processor(vis.get("eval")),
            "text_train": self._build_processor(text.get("train")),
            "text_eval": self._build_processor(text.get("eval")),
        }

    # -- building -----------------------------------------------------------------------------
    def splits(self) -> list[str]:
        annotations = self.config.build_info.get("annotations") or {}
        annotations = {s: node for s, node in annotations.items() if node is not None}  # null: split switched off
        wanted = _as_list(self.config.get("splits")) or [s for s in SPLITS if s in annotations]
        unknown = [s for s in wanted if s not in annotations]
        if unknown:
            raise KeyError(
                f"{type(self).__name__}: split(s) {unknown} requested but build_info.annotations has "
                f"only {sorted(annotations)}"
            )
        return wanted

    def annotation_paths(self, split: str) -> list[str]:
        node = self.config.build_info.annotations[split]
        paths = [self.resolve_path(p) for p in _as_list(node.get("storage"))]
        if not paths:
            raise KeyError(f"{type(self).__name__}: build_info.annotations.{split}.storage is empty")
        return [self.require_file(p, f"build_info.annotations.{split}.storage") for p in paths]

    def media_root(self) -> str:
        key = "videos" if self.data_type == "videos" else "images"
        node = self.config.build_info.get(key)
        if node is None or node.get("storage") is None:
            raise KeyError(f"{type(self).__name__}: build_info.{key}.storage is not set")
        kind = "video directory" if key == "videos" else "image directory"
        return self.require_dir(self.resolve_path(node.storage), f"build_info.{key}.storage", kind)

    def extra_file(self, split: str, key: str) -> str | None:
        """Path of an optional per-split extra file (``build_info.annotations.<split>.<key>.storage``)."""
        node = self.config.build_info.annotations[split].get(key)
        if node is None:
            return None
        storage = node.get("storage") if isinstance(node, DictConfig) else node
        return self.require_file(
            self.resolve_path(storage), f"build_info.annotations.{split}.{key}", kind=key.replace("_", " ")
        )

    def dataset_kwargs(self, split: str, is_train: bool) -> dict[str, Any]:
        """Keyword arguments for the dataset class beyond processors, paths and policy."""
        kwargs: dict[str, Any] = {}
        if self.config.get("fields"):
            kwargs["fields"] = dict(OmegaConf.to_container(self.config.fields, resolve=True))
        return kwargs

    def build_datasets(self) -> dict[str, Dataset]:
        """Check every path first, then build ``{split: dataset}`` (train side uses train processors)."""
        plan = {split: self.annotation_paths(split) for split in self.splits()}
        root = self.media_root()
        extra = {split: self.dataset_kwargs(split, split == "train") for split in plan}
        procs = self.build_processors()
        policy = self.config.get("bad_media_policy", "skip")
        datasets: dict[str, Dataset] = {}
        for split, ann_paths in plan.items():
            is_train = split == "train"
            cls = self.train_dataset_cls if is_train else self.eval_dataset_cls
            if cls is None:
                raise KeyError(f"{type(self).__name__} has no dataset class for split {split!r}")
            datasets[split] = cls(
                procs["vis_train" if is_train else "vis_eval"],
                procs["text_train" if is_train else "text_eval"],
                ann_paths,
                root,
                is_train=is_train,
                bad_media_policy=policy,
                **extra[split],
            )
        return datasets
