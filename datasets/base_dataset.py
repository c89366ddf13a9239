"""The base map-style dataset (annotations + media + bad-file policy) and the batch collater.

Every dataset turns annotation record ``i`` into a sample dict with the conventional keys
(see ARCHITECTURE.md). A corrupt or missing media file never shrinks a batch: with policy
``skip`` the sample is replaced deterministically by the next readable one (train) or keeps
its identity with the substitute's media (eval, so each id is scored exactly once).
"""
from __future__ import annotations

import logging
import numbers
import os
import re
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from datasets.annotations import PackedRecords, load_annotations, require_fields
from datasets.media import BadMediaError, load_image, report_bad_media

logger = logging.getLogger(__name__)

BAD_MEDIA_POLICIES = ("skip", "error")
# Keys whose int-like values become a LongTensor [B] (image_id feeds ITC duplicate detection).
TENSOR_ID_KEYS = ("image_id", "n_answers", "index")


def _identity(x: Any) -> Any:
    return x


def _is_int_like(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_floating_point()
    return isinstance(value, str) and value.isdigit()


def collate_samples(samples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Batch sample dicts: stack equal-shape tensors, int-like ids -> LongTensor, rest -> lists.

    Only keys present in every sample are kept (mixed datasets may differ in optional keys).
    ``None`` entries are refused: datasets substitute bad samples instead of shrinking batches.
    """
    if len(samples) == 0:
        raise ValueError("collate_samples got an empty batch")
    if any(s is None for s in samples):
        raise ValueError("collate_samples got a None sample; datasets must substitute bad samples")
    keys = [k for k in samples[0] if all(k in s for s in samples[1:])]
    batch: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in samples]
        if all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
            batch[key] = torch.stack(values)
        elif key in TENSOR_ID_KEYS and all(_is_int_like(v) for v in values):
            batch[key] = torch.tensor([int(v) for v in values], dtype=torch.long)
        else:
            batch[key] = values
    return batch


class BaseDataset(Dataset):
    """Annotation records + media root + processors, with the bad-media policy.

    Subclasses implement ``media_path(ann)`` and ``make_sample(ann, index, media)``;
    ``read_media(path)`` (image by default) and ``process_media`` may be overridden (video).
    """

    #: canonical field name -> record key; a config's ``fields:`` overrides entries
    default_fields: dict[str, str] = {}
    #: canonical fields every record must have (checked once at construction, naming the file)
    required_fields: tuple[str, ...] = ()

    def __init__(
        self,
        vis_processor: Callable | None = None,
        text_processor: Callable | None = None,
        ann_paths: str | Sequence[str] = (),
        vis_root: str = "",
        *,
        is_train: bool = True,
        bad_media_policy: str = "skip",
        max_substitute_tries: int = 32,
        annotation: list[dict[str, Any]] | None = None,
        fields: dict[str, str] | None = None,
    ) -> None:
        if bad_media_policy not in BAD_MEDIA_POLICIES:
            raise ValueError(f"bad_media_policy={bad_media_policy!r}; expected one of {BAD_MEDIA_POLICIES}")
        self.vis_processor = vis_processor or _identity
        self.text_processor = text_processor or _identity
        self.vis_root = vis_root
        self.ann_paths = [ann_paths] if isinstance(ann_paths, str) else list(ann_paths)
        self.is_train = is_train
        self.bad_media_policy = bad_media_policy
        self.max_substitute_tries = max_substitute_tries
        self.annotation = annotation if annotation is not None else load_annotations(self.ann_paths)
        unknown = set(fields or {}) - set(self.default_fields)
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: unknown field name(s) {sorted(unknown)} in `fields`; "
                f"settable fields: {sorted(self.default_fields)}"
            )
        self.fields = {**self.default_fields, **(fields or {})}
        source = ", ".join(self.ann_paths) or "<in-memory annotation>"
        require_fields(
            self.annotation,
            [self.fields[f] for f in self.required_fields],
            source,
            hint="Rename it in the dataset config with `fields: {<name>: <your key>}` "
            f"(current mapping: {self.fields})",
        )
        records = self.prepare_annotation(self.annotation)
        for idx, ann in enumerate(records):
            ann.setdefault("instance_id", str(idx))
        self.annotation: Sequence[dict[str, Any]] = PackedRecords(records)  # read-only from here on
        self.num_bad_media = 0  # counted in this process (each DataLoader worker has its own)
        self._bad_indices: set[int] = set()

    def __len__(self) -> int:
        return len(self.annotation)

    def get(self, ann: dict[str, Any], name: str, default: Any = None) -> Any:
        """Value of canonical field ``name`` in record ``ann`` (through the field mapping)."""
        return ann.get(self.fields[name], default)

    # -- to implement -------------------------------------------------------------------------
    def prepare_annotation(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Reshape records once at construction (e.g. one record per caption); identity here."""
        return records

    def media_path(self, ann: dict[str, Any]) -> str:
        raise NotImplementedError

    def make_sample(self, ann: dict[str, Any], index: int, media: Any) -> dict[str, Any]:
        raise NotImplementedError

    # -- media --------------------------------------------------------------------------------
    def read_media(self, path: str) -> Any:
        return load_image(path)

    def process_media(self, media: Any) -> Any:
        return self.vis_processor(media)

    def resolve(self, relpath: str) -> str:
        return relpath if os.path.isabs(relpath) else os.path.join(self.vis_root, relpath)

    def _load(self, index: int) -> Any:
        return self.process_media(self.read_media(self.media_path(self.annotation[index])))

    def _load_or_substitute(self, index: int) -> tuple[int, Any]:
        """Media for ``index``; on a bad file, count, warn and walk to the next readable index."""
        first_error: BadMediaError | None = None
        n = len(self.annotation)
        for step in range(min(self.max_substitute_tries, n)):
            j = (index + step) % n
            if j in self._bad_indices:
                continue
            try:
                return j, self._load(j)
            except BadMediaError as e:
                if self.bad_media_policy == "error":
                    raise
                self._bad_indices.add(j)
                self.num_bad_media += 1
                report_bad_media(logger, type(self).__name__, e, self.num_bad_media)
                first_error = first_error or e
        raise RuntimeError(
            f"{type(self).__name__}: no readable media within {self.max_substitute_tries} samples "
            f"from index {index}; first failure: {first_error}"
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        used, media = self._load_or_substitute(index)
        if self.is_train:  # a substitute sample keeps its own text so image and text still match
            index = used
        return self.make_sample(self.annotation[index], index, media)

    def collater(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_samples(samples)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={len(self)}, split={'train' if self.is_train else 'eval'}, "
            f"vis_root={self.vis_root!r}, ann_paths={self.ann_paths})"
        )


def contiguous_ids(keys: Sequence[Any]) -> dict[Any, int]:
    """Map each distinct key to 0..K-1 in order of first appearance."""
    mapping: dict[Any, int] = {}
    for k in keys:
        if k not in mapping:
            mapping[k] = len(mapping)
    return mapping


def numeric_image_ids(image_paths: Sequence[str]) -> dict[str, int]:
    """COCO-style int ids from the trailing digits of file names, or contiguous ids.

    ``val2014/COCO_val2014_000000391895.jpg`` -> 391895, ``video7010.mp4`` -> 7010 (matches the official COCO ids, so
    ground truth and results agree with the COCO caption evaluation). If any name lacks digits
    or two images share digits, every image gets a contiguous id instead.
    """
    unique = list(contiguous_ids(image_paths))
    ids: dict[str, int] = {}
    for p in unique:
        digits = re.search(r"(\d+)$", os.path.splitext(os.path.basename(p))[0])
        if digits is None:
            return {q: i for i, q in enumerate(unique)}
        ids[p] = int(digits.group(1))
    if len(set(ids.values())) != len(ids):
        return {q: i for i, q in enumerate(unique)}
    return ids
