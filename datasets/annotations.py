"""Reading annotation files (JSON, JSONL, CSV, TSV) into lists of records, with clear errors.

LAVIS annotation files are JSON lists of dicts; users also bring JSON Lines and CSV/TSV files
with a header row. Every loader returns ``list[dict]`` so the dataset classes never care which.
"""
from __future__ import annotations

import csv
import json
import os
import pickle
from collections.abc import Sequence as SequenceABC
from typing import Any, Iterable, Sequence

import numpy as np

ANNOTATION_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv")


class AnnotationError(ValueError):
    """An annotation file is unreadable or lacks a field the dataset needs."""


def load_annotation_file(path: str) -> list[dict[str, Any]]:
    """Load one annotation file as a list of records.

    A JSON dict of dicts (``{key: record}``) becomes records carrying ``sample_id=key``;
    a JSON dict holding one list under ``annotations``/``data``/``questions`` is unwrapped.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                records = [json.loads(line) for line in f if line.strip()]
        elif suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8", newline="") as f:
                records = [dict(row) for row in csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")]
        elif suffix == ".json":
            with open(path, encoding="utf-8") as f:
                records = _json_records(json.load(f), path)
        else:
            raise AnnotationError(
                f"annotation file {path}: unsupported suffix '{suffix}'; expected one of {ANNOTATION_SUFFIXES}"
            )
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise AnnotationError(f"annotation file {path} could not be parsed: {e}") from e
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise AnnotationError(
                f"annotation file {path}: record {i} is a {type(rec).__name__}, expected an object/dict"
            )
    return records


def _json_records(data: Any, path: str) -> list[dict[str, Any]]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for key in ("annotations", "data", "questions"):
            if isinstance(data.get(key), list) and len(data) <= 3:
                return data[key]
        if data and all(isinstance(v, dict) for v in data.values()):
            return [{"sample_id": k, **v} for k, v in data.items()]
    raise AnnotationError(
        f"annotation file {path}: expected a JSON list of records (or a dict of records), "
        f"got {type(data).__name__}"
    )


def load_annotations(paths: str | Sequence[str]) -> list[dict[str, Any]]:
    """Load and concatenate the records of one or several annotation files."""
    if isinstance(paths, str):
        paths = [paths]
    records: list[dict[str, Any]] = []
    for path in paths:
        records.extend(load_annotation_file(path))
    return records


def require_fields(
    records: Sequence[dict[str, Any]],
    fields: Iterable[str],
    source: str,
    hint: str = "",
) -> None:
    """Raise ``AnnotationError`` naming the file, record and field if any record lacks a field."""
    fields = list(fields)
    for i, rec in enumerate(records):
        missing = [f for f in fields if f not in rec]
        if missing:
            raise AnnotationError(
                f"annotation {source}: record {i} has no field {missing[0]!r} "
                f"(needed: {fields}; the record has: {sorted(rec)})" + (f". {hint}" if hint else "")
            )


class PackedRecords(SequenceABC):
    """Read-only records pickled into one numpy byte buffer.

    A Python list of millions of dicts is copied page by page into every forked DataLoader
    worker as reference counts get touched (the "RAM keeps growing" symptom). One flat buffer
    has no per-record objects, so workers keep sharing its pages. Each access returns a fresh dict.
    """

    def __init__(self, records: Iterable[dict[str, Any]]) -> None:
        blobs = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._data = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        start = int(self._ends[index - 1]) if index > 0 else 0
        return pickle.loads(memoryview(self._data[start : int(self._ends[index])]))

    def __repr__(self) -> str:
        return f"PackedRecords({len(self)} records, {self._data.nbytes} bytes)"
