"""Image-text retrieval datasets (COCO, Flickr30k Karpathy splits).

Train: one sample per (image, caption) with a contiguous int ``image_id`` so ITC knows which
in-batch pairs share an image. Eval: one sample per image, and the full caption list in
``text`` with the ``txt2img`` / ``img2txt`` ground-truth maps the retrieval task scores against.
"""
from __future__ import annotations

from typing import Any

from datasets.base_dataset import BaseDataset
from datasets.caption_datasets import CaptionDataset


class RetrievalDataset(CaptionDataset):
    """``{"image", "text_input", "image_id": int, "instance_id"}`` per caption."""


class RetrievalEvalDataset(BaseDataset):
    """Images as samples (``{"image", "index", "image_id", "instance_id"}``), texts as attributes.

    Attributes: ``image`` (list of image paths, relative as in the annotation), ``text``
    (processed captions), ``txt2img`` {text index: image index}, ``img2txt`` {image index: [text
    indices]}.
    """

    default_fields = {"image": "image", "caption": "caption"}
    required_fields = ("image", "caption")

    def prepare_annotation(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        grouped: dict[str, dict[str, Any]] = {}
        for r in records:
            path = self.get(r, "image")
            caps = self.get(r, "caption")
            caps = list(caps) if isinstance(caps, (list, tuple)) else [caps]
            if path in grouped:
                grouped[path]["_captions"].extend(caps)
            else:
                grouped[path] = {**r, "_captions": caps}
        out = list(grouped.values())
        self.image: list[str] = []
        self.text: list[str] = []
        self.img2txt: dict[int, list[int]] = {}
        self.txt2img: dict[int, int] = {}
        for img_idx, r in enumerate(out):
            self.image.append(self.get(r, "image"))
            self.img2txt[img_idx] = []
            for caption in r["_captions"]:
                self.txt2img[len(self.text)] = img_idx
                self.img2txt[img_idx].append(len(self.text))
                self.text.append(self.text_processor(caption))
        return out

    def media_path(self, ann: dict[str, Any]) -> str:
        return self.resolve(self.get(ann, "image"))

    def make_sample(self, ann: dict[str, Any], index: int, media: Any) -> dict[str, Any]:
        return {"image": media, "index": index, "image_id": index, "instance_id": ann["instance_id"]}
