"""Caption / image-text-pair datasets (train and eval) and COCO-format caption ground truth.

Train records: ``{"image", "caption": str | [str], "image_id"?}`` (COCO Karpathy train, VG, CC,
SBU, a user's pairs). Eval records: ``{"image", "caption": [5 strings]}`` (Karpathy val/test) or
NoCaps ``{"image", "img_id"}``.
"""
from __future__ import annotations

import json
import os
from typing import Any

from datasets.base_dataset import BaseDataset, contiguous_ids, numeric_image_ids


def one_record_per_caption(records: list[dict[str, Any]], caption_key: str) -> list[dict[str, Any]]:
    """Expand records whose caption is a list into one record per caption."""
    out: list[dict[str, Any]] = []
    for rec in records:
        caption = rec[caption_key]
        if isinstance(caption, (list, tuple)):
            out.extend({**rec, caption_key: c} for c in caption)
        else:
            out.append(rec)
    return out


class CaptionDataset(BaseDataset):
    """Image + one caption per sample -> ``{"image", "text_input", "image_id", "instance_id"}``.

    ``image_id`` is a contiguous int per distinct image (from the ``image_id`` field when the
    records have one, else from the image path), so ITC can mask same-image pairs.
    """

    default_fields = {"image": "image", "caption": "caption", "image_id": "image_id"}
    required_fields = ("image", "caption")

    def prepare_annotation(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        records = one_record_per_caption(records, self.fields["caption"])
        keys = [self.get(r, "image_id", self.get(r, "image")) for r in records]
        self.img_ids = contiguous_ids(keys)
        for r, k in zip(records, keys):
            r["_image_index"] = self.img_ids[k]
        return records

    @property
    def num_image_ids(self) -> int:
        return len(self.img_ids)

    def media_path(self, ann: dict[str, Any]) -> str:
        return self.resolve(self.get(ann, "image"))

    def make_sample(self, ann: dict[str, Any], index: int, media: Any) -> dict[str, Any]:
        return {
            "image": media,
            "text_input": self.text_processor(self.get(ann, "caption")),
            "image_id": ann["_image_index"],
            "instance_id": ann["instance_id"],
        }


class ImageTextPairDataset(CaptionDataset):
    """Image-text pairs for pre-training (VG, CC3M/12M, SBU, a user's own pairs)."""


class CaptionGroundTruthMixin:
    """``ground_truth`` {image_id: [captions]} -> COCO caption-evaluation format."""

    ground_truth: dict[int, list[str]]

    def coco_ground_truth(self) -> dict[str, Any]:
        """``{"images": [{"id"}], "annotations": [{"image_id", "caption", "id"}]}`` (pycocotools layout)."""
        images, annotations = [], []
        for image_id, captions in self.ground_truth.items():
            images.append({"id": image_id})
            for caption in captions:
                annotations.append({"image_id": image_id, "caption": caption, "id": len(annotations)})
        return {"info": {}, "licenses": [], "type": "captions", "images": images, "annotations": annotations}

    def write_coco_ground_truth(self, path: str) -> str:
        """Write ``coco_ground_truth()`` as JSON to ``path`` (directories created) and return it."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.coco_ground_truth(), f)
        return path


class CaptionEvalDataset(CaptionGroundTruthMixin, BaseDataset):
    """One sample per image -> ``{"image", "image_id", "instance_id"}`` for caption generation.

    ``image_id`` follows COCO (trailing digits of the file name) when unambiguous. Records with a
    string caption are grouped per image, so train-format files also work for evaluation.
    """

    default_fields = {"image": "image", "caption": "caption", "image_id": "image_id"}
    required_fields = ("image",)

    def prepare_annotation(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        grouped: dict[str, dict[str, Any]] = {}
        for r in records:
            path = self.get(r, "image")
            caps = self.get(r, "caption", [])
            caps = list(caps) if isinstance(caps, (list, tuple)) else [caps]
            if path in grouped:
                grouped[path]["_captions"].extend(caps)
            else:
                grouped[path] = {**r, "_captions": caps}
        out = list(grouped.values())
        ids = self.eval_image_ids(out)
        self.ground_truth = {}
        for r, image_id in zip(out, ids):
            r["_image_id"] = image_id
            if r["_captions"]:
                self.ground_truth[image_id] = [str(c) for c in r["_captions"]]
        return out

    def eval_image_ids(self, records: list[dict[str, Any]]) -> list[int]:
        mapping = numeric_image_ids([self.get(r, "image") for r in records])
        return [mapping[self.get(r, "image")] for r in records]

    def media_path(self, ann: dict[str, Any]) -> str:
        return self.resolve(self.get(ann, "image"))

    def make_sample(self, ann: dict[str, Any], index: int, media: Any) -> dict[str, Any]:
        return {"image": media, "image_id": ann["_image_id"], "instance_id": ann["instance_id"]}


NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")


class NoCapsEvalDataset(CaptionEvalDataset):
    """NoCaps val/test: ``image_id`` is the record's ``img_id`` (the official NoCaps id).

    ``domain_file``: the official NoCaps image-info JSON (``nocaps_val_4500_captions.json``: ``images`` with ``id``
    and ``domain``); it fills ``domains`` (image_id -> in-domain | near-domain | out-domain), which the captioning
    task uses to report each domain besides the overall scores.
    """

    default_fields = {"image": "image", "caption": "caption", "image_id": "img_id"}
    required_fields = ("image", "image_id")

    def __init__(self, *args: Any, domain_file: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.domains: dict[Any, str] | None = None if domain_file is None else self._read_domains(domain_file)

    def _read_domains(self, path: str) -> dict[Any, str]:
        with open(path) as f:
            info = json.load(f)
        images = info.get("images") if isinstance(info, dict) else None
        if not isinstance(images, list):
            raise ValueError(f"NoCaps domain file {path}: expected the official image info, a JSON object with an "
                             f"'images' list of {{'id', 'domain'}}")
        domains = {}
        for image in images:
            if image.get("domain") not in NOCAPS_DOMAINS:
                raise ValueError(f"NoCaps domain file {path}: image {image.get('id')!r} has domain "
                                 f"{image.get('domain')!r}; expected one of {NOCAPS_DOMAINS}")
            domains[image["id"]] = image["domain"]
        ids = [r["_image_id"] for r in self.annotation]
        missing = [i for i in ids if i not in domains]
        if missing:
            raise KeyError(f"NoCaps domain file {path} has no domain for {len(missing)} evaluated image ids "
                           f"(e.g. {missing[:5]}); is it the file of this split?")
        return {i: domains[i] for i in ids}

    def eval_image_ids(self, records: list[dict[str, Any]]) -> list[int]:
        ids = [self.get(r, "image_id") for r in records]
        return [int(i) if isinstance(i, int) or str(i).isdigit() else i for i in ids]  # ints when int-like
