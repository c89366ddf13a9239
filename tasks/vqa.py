"""``vqa`` (VQAv2 / OK-VQA accuracy) and ``gqa`` (exact match) question-answering tasks.

Run options (``run:`` section, LAVIS names): num_beams, max_len, min_len, inference_method ("generate" or
"rank"), num_ans_candidates, prompt ("" = the raw question; BLIP-2 zero-shot uses "Question: {} Short answer:"),
length_penalty (the ones a run leaves out keep the defaults of the model's ``predict_answers``), apply_lemmatizer (False; OK-VQA), normalize_references (False), sample_id_key ("question_id"),
annotation_file / anno_files {split: path} (official COCO-format VQA annotations; default: the
dataset's ``coco_annotation_file``, else its records), answer_list (path; default: the
dataset's ``answer_list``, needed by "rank").
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import torch

import registry
from common.dist import is_main_process
from tasks.base_task import BaseTask, call_with_supported_kwargs, id_value
from tasks.metrics.vqa import AnswerLemmatizer, gqa_exact_match, vqa_scores

INFERENCE_METHODS = ("generate", "rank")


def _record_value(dataset: Any, ann: dict, name: str, default: Any = None) -> Any:
    """A canonical field of an annotation record, through the dataset's field mapping if any."""
    if hasattr(dataset, "get") and getattr(dataset, "fields", None) and name in dataset.fields:
        return dataset.get(ann, name, default)
    return ann.get(name, default)


def _question_id(dataset: Any, ann: dict) -> Any:
    return id_value(_record_value(dataset, ann, "question_id", ann.get("instance_id")))


def load_vqa_annotation_file(path: str) -> dict[Any, dict[str, Any]]:
    """question_id -> {"answers", "answer_type", "question_type"} from an official VQA annotation file."""
    with open(path) as f:
        data = json.load(f)
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise ValueError(f"{path}: not a VQA annotation file (expected a dict with an 'annotations' list)")
    out = {}
    for i, ann in enumerate(annotations):
        if "question_id" not in ann or "answers" not in ann:
            raise ValueError(f"{path}: annotation {i} lacks 'question_id' or 'answers' (keys: {sorted(ann)})")
        answers = [a["answer"] if isinstance(a, Mapping) else str(a) for a in ann["answers"]]
        out[id_value(ann["question_id"])] = {
            "answers": answers,
            "answer_type": ann.get("answer_type"),
            "question_type": ann.get("question_type"),
        }
    return out


def vqa_ground_truth_from_records(dataset: Any) -> dict[Any, dict[str, Any]]:
    """question_id -> {"answers", ...} from a dataset's annotation records (raw answer lists)."""
    annotation = getattr(dataset, "annotation", None)
    if annotation is None:
        raise TypeError(
            f"vqa: {type(dataset).__name__} has neither `coco_annotation_file` nor `annotation` records; "
            "set run.annotation_file to the official VQA annotation file"
        )
    out = {}
    for i, ann in enumerate(annotation):
        answers = _record_value(dataset, ann, "answer")
        if answers is None:
            raise KeyError(
                f"vqa: annotation record {i} of {type(dataset).__name__} has no answer (keys: {sorted(ann)}); "
                "scoring needs the reference answers (set run.report_metric: false to only write the results)"
            )
        answers = [answers] if isinstance(answers, str) else [str(a) for a in answers]
        out[_question_id(dataset, ann)] = {
            "answers": answers,
            "answer_type": ann.get("answer_type"),
            "question_type": ann.get("question_type"),
        }
    return out


@registry.tasks.register("vqa")
class VQATask(BaseTask):
    """Answers with ``model.predict_answers``; VQAv2 accuracy overall and per answer type."""

    #: run keys this task reads (runners.config validates ``run:`` against them)
    RUN_KEYS = {
        "num_beams": "beam width", "max_len": "max answer tokens", "min_len": "min answer tokens",
        "inference_method": "generate | rank", "num_ans_candidates": "answers kept for ranking",
        "prompt": "prompt with '{}' for the question, e.g. 'Question: {} Short answer:'",
        "length_penalty": "beam length penalty",
        "apply_lemmatizer": "lemmatise predicted answers with spaCy (OK-VQA)",
        "normalize_references": "always normalise reference answers (user data)",
        "sample_id_key": "batch key holding the question id (question_id)",
        "annotation_file": "official COCO-format VQA annotation file",
        "anno_files": "{split: COCO-format VQA annotation file}",
        "answer_list": "JSON list of candidate answers (default: the eval dataset's)",
    }

    #: run keys handed to ``predict_answers`` as they are (LAVIS names)
    INFERENCE_KEYS = ("num_beams", "inference_method", "max_len", "min_len", "num_ans_candidates", "prompt",
                      "length_penalty")

    def __init__(self, run_cfg=None) -> None:
        super().__init__(run_cfg)
        cfg = self.run_cfg
        method = cfg.get("inference_method")
        if method is not None and method not in INFERENCE_METHODS:
            raise ValueError(f"run.inference_method={method!r}; expected one of {INFERENCE_METHODS}")
        # Only what the run sets is passed: the defaults live in the model's predict_answers() signature.
        self.inference = {key: cfg[key] for key in self.INFERENCE_KEYS if cfg.get(key) is not None}
        self.sample_id_key: str = cfg.get("sample_id_key", "question_id")
        self.lemmatizer = AnswerLemmatizer() if cfg.get("apply_lemmatizer", False) else None
        self.normalize_references = bool(cfg.get("normalize_references", False))
        self.answer_list_path: str | None = cfg.get("answer_list")
        self._answer_list: list[str] | None = None
        self._gt_cache: tuple[str, dict] | None = None  # (annotation file, parsed) - VQAv2 val is large

    # -- inference ------------------------------------------------------------------------------
    def answer_list(self) -> list[str] | None:
        """Candidate answers for ranking: ``run.answer_list`` if set, else the eval dataset's."""
        if self.answer_list_path:
            if self._answer_list is None:
                with open(self.answer_list_path) as f:
                    data = json.load(f)
                self._answer_list = list(data) if isinstance(data, (list, dict)) else None
                if self._answer_list is None:
                    raise ValueError(f"run.answer_list {self.answer_list_path}: expected a JSON list of answers")
            return self._answer_list
        return getattr(self.eval_dataset, "answer_list", None)

    def valid_step(self, model: torch.nn.Module, samples: dict) -> list[dict]:
        answer_list = self.answer_list()
        ranking = self.inference.get("inference_method") == "rank"
        if ranking and samples.get("choices") is not None:
            answers = self.rank_among_choices(model, samples)
        else:
            if ranking and not answer_list:
                raise ValueError(
                    "vqa: run.inference_method='rank' needs candidate answers: the eval dataset has no "
                    "answer_list; set run.answer_list to a JSON list of answers or use 'generate'"
                )
            answers = call_with_supported_kwargs(model.predict_answers, samples, answer_list=answer_list,
                                                 **self.inference)
        if self.lemmatizer is not None:
            answers = self.lemmatizer(answers)
        if self.sample_id_key not in samples:
            raise KeyError(f"vqa: batch has no '{self.sample_id_key}' (keys: {sorted(samples)})")
        ids = samples[self.sample_id_key]
        if len(answers) != len(ids):
            raise ValueError(f"vqa: model returned {len(answers)} answers for {len(ids)} questions")
        records = [{"question_id": id_value(q), "answer": a} for q, a in zip(ids, answers)]
        if "answers" in samples:  # gold answers travel with the results (GQA scores from them)
            for rec, gold in zip(records, samples["answers"]):
                rec["gt_answers"] = list(gold)
        return records

    def rank_among_choices(self, model: torch.nn.Module, samples: dict) -> list[str]:
        """Multiple choice: each question ranked among its own ``choices`` (all of them re-scored), one
        ``predict_answers`` call per distinct choice list in the batch."""
        choices = [tuple(c) for c in samples["choices"]]
        batch = len(choices)
        answers: list[str | None] = [None] * batch
        for group in dict.fromkeys(choices):
            rows = [i for i, c in enumerate(choices) if c == group]
            part = {k: _take(v, rows, batch) for k, v in samples.items()}
            options = {**self.inference, "num_ans_candidates": len(group)}
            for i, answer in zip(rows, call_with_supported_kwargs(model.predict_answers, part,
                                                                  answer_list=list(group), **options)):
                answers[i] = answer
        return answers

    # -- scoring --------------------------------------------------------------------------------
    def annotation_file(self, split: str) -> str | None:
        files = self.run_cfg.get("anno_files") or {}
        return files.get(split) or self.run_cfg.get("annotation_file") or getattr(
            self.eval_dataset, "coco_annotation_file", None
        )

    def ground_truth(self, split: str) -> dict[Any, dict[str, Any]]:
        path = self.annotation_file(split)
        if path:
            if self._gt_cache is None or self._gt_cache[0] != str(path):
                self._gt_cache = (str(path), load_vqa_annotation_file(path))
            return self._gt_cache[1]
        if self.eval_dataset is None:
            raise ValueError("vqa: no dataset evaluated yet and no run.annotation_file to score against")
        return vqa_ground_truth_from_records(self.eval_dataset)

    def after_evaluation(self, results: list[dict], split: str, epoch: Any) -> dict[str, Any]:
        merged = self.merge_results(results, self.result_name(split, epoch), dedup_key="question_id")
        if not self.report_metric:
            return self.unscored(merged, split, epoch)
        metrics = None
        if is_main_process():
            predictions = {r["question_id"]: r["answer"] for r in merged}
            scores = vqa_scores(predictions, self.ground_truth(split), self.normalize_references)
            metrics = {"agg_metrics": scores["overall"], "overall": scores["overall"]}
            metrics.update(scores["per_answer_type"])
            metrics["num_questions"] = scores["num_questions"]
        return self.finish_metrics(metrics, split, epoch)


@registry.tasks.register("gqa")
class GQATask(VQATask):
    """GQA: exact match after the VQA normalisation (one gold answer per question)."""

    def after_evaluation(self, results: list[dict], split: str, epoch: Any) -> dict[str, Any]:
        merged = self.merge_results(results, self.result_name(split, epoch), dedup_key="question_id")
        if not self.report_metric:
            return self.unscored(merged, split, epoch)
        metrics = None
        if is_main_process():
            if not merged:
                raise ValueError(f"gqa: no predictions for split '{split}'")
            need_gt = any(not r.get("gt_answers") for r in merged)
            gt = self.ground_truth(split) if need_gt else {}
            hits = 0
            for rec in merged:
                gold = rec.get("gt_answers") or gt.get(rec["question_id"], {}).get("answers")
                if not gold:
                    raise KeyError(
                        f"gqa: no gold answer for question_id {rec['question_id']} "
                        "(set run.report_metric: false to only write the results)"
                    )
                hits += gqa_exact_match(rec["answer"], gold[0])
            accuracy = 100.0 * hits / len(merged)
            metrics = {"agg_metrics": accuracy, "accuracy": accuracy, "num_questions": len(merged)}
        return self.finish_metrics(metrics, split, epoch)


def _take(value: Any, rows: list[int], batch: int) -> Any:
    """The ``rows`` of a batch entry (a tensor or list with one item per sample); other values as they are."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, list) and len(value) == batch:
        return [value[i] for i in rows]
    return value
