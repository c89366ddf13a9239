"""Evaluation metrics used by the tasks: caption scores, VQA accuracy / GQA exact match, recall@k.

Heavy or optional libraries (pycocoevalcap, spaCy) are imported only when a metric runs.
"""
from tasks.metrics.caption import (
    ALL_METRICS as CAPTION_METRICS,
    caption_scores,
    load_coco_caption_gt,
    spice_available,
    write_coco_caption_gt,
)
from tasks.metrics.retrieval import recall_at_k, retrieval_metrics
from tasks.metrics.vqa import (
    AnswerLemmatizer,
    gqa_accuracy,
    gqa_exact_match,
    normalize_answer,
    vqa_accuracy,
    vqa_scores,
)

__all__ = [
    "CAPTION_METRICS",
    "caption_scores",
    "load_coco_caption_gt",
    "spice_available",
    "write_coco_caption_gt",
    "recall_at_k",
    "retrieval_metrics",
    "AnswerLemmatizer",
    "gqa_accuracy",
    "gqa_exact_match",
    "normalize_answer",
    "vqa_accuracy",
    "vqa_scores",
]
