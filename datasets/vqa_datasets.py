"""Visual question answering datasets: VQAv2 / OK-VQA (COCO images) and GQA.

Train records: ``{"question_id", "question", "answer": [answers] | str, "image"}``. A sample
carries the processed question as ``text_input``, the unique answers with their vote weights
(count / number of answers), ``n_answers``, and the most voted answer as ``text_output`` (the
target the LLM-based models train on). Eval datasets expose ``answer_list`` and the
COCO-format question/annotation files the official VQA evaluation reads.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

from datasets.base_dataset import BaseDataset


def answer_weights(answers: Any) -> tuple[list[str], list[float]]:
    """Unique answers (first-seen order) and their share of the votes."""
    if isinstance(answers, str):
        answers = [answers]
    answers = [str(a) for a in answers]
    if not answers:
        return [], []
    counts = Counter(answers)
    unique = list(dict.fromkeys(answers))
    return unique, [counts[a] / len(answers) for a in unique]


def load_answer_list(path: str) -> list[str]:
    """An answer list: a JSON list of strings, or a dict ``{answer: label}`` (its keys)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"answer list not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict):
        return [str(k) for k in data]
    if isinstance(data, list) and all(isinstance(a, str) for a in data):
        return data
    raise ValueError(f"answer list {path}: expected a JSON list of strings or a dict answer->label")


class VQADataset(BaseDataset):
    """Training VQA samples with ``answers``, ``weights``, ``n_answers`` and ``text_output``."""

    default_fields = {"image": "image", "question": "question", "answer": "answer", "question_id": "question_id"}
    required_fields = ("image", "question", "answer")

    def media_path(self, ann: dict[str, Any]) -> str:
        return self.resolve(self.get(ann, "image"))

    def make_sample(self, ann: dict[str, Any], index: int, media: Any) -> dict[str, Any]:
        answers, weights = answer_weights(self.get(ann, "answer"))
        best = answers[max(range(len(weights)), key=weights.__getitem__)] if answers else ""
        return {
            "image": media,
            "text_input": self.text_processor(self.get(ann, "question")),
            "text_output": best,
            "answers": answers,
            "weights": weights,
            "n_answers": len(answers),
            "question_id": self.get(ann, "question_id", ann["instance_id"]),
            "instance_id": ann["instance_id"],
        }


class VQAEvalDataset(BaseDataset):
    """Eval VQA samples ``{"image", "text_input", "question_id", "instance_id"}`` (+ answers if given, + ``choices``
    when a record lists its own candidate answers).

    ``answer_list`` (list[str] or None), ``coco_question_file`` and ``coco_annotation_file``
    (paths or None) are set by the builder from the config.
    """

    default_fields = VQADataset.default_fields
    required_fields = ("image", "question")

    def __init__(
        self,
        *args: Any,
        answer_list_path: str | None = None,
        coco_question_file: str | None = None,
        coco_annotation_file: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.answer_list = load_answer_list(answer_list_path) if answer_list_path else None
        self.coco_question_file = coco_question_file
        self.coco_annotation_file = coco_annotation_file

    def media_path(self, ann: dict[str, Any]) -> str:
        return self.resolve(self.get(ann, "image"))

    def make_sample(self, ann: dict[str, Any], index: int, media: Any) -> dict[str, Any]:
        sample = {
            "image": media,
            "text_input": self.text_processor(self.get(ann, "question")),
            "question_id": self.get(ann, "question_id", ann["instance_id"]),
            "instance_id": ann["instance_id"],
        }
        if self.fields["answer"] in ann:
            answers, weights = answer_weights(self.get(ann, "answer"))
            sample.update(answers=answers, weights=weights, n_answers=len(answers))
        if "choices" in ann:  # a multiple-choice question (A-OKVQA's layout): rank answers among its own choices
            sample["choices"] = [str(c) for c in ann["choices"]]
        return sample


class GQADataset(VQADataset):
    """GQA in the LAVIS layout ``{"image", "question", "question_id", "answer": str}``."""


class GQAEvalDataset(VQAEvalDataset):
    """GQA eval: the gold answer (when present) is in ``answers`` (one entry) for exact match."""
