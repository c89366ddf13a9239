"""``captioning``: generate captions with the configured decoding and score them (COCO caption metrics).

Run options (``run:`` section, LAVIS names): num_beams (5), max_len (30), min_len (1),
repetition_penalty (1.0), length_penalty (1.0), top_p (0.9), temperature (1.0),
use_nucleus_sampling (False), prompt ("" = the model's own), annotation_file (a COCO caption file;
default: built from the evaluated dataset), caption_metrics (default: all, SPICE when available),
sample_id_key ("image_id").

``agg_metrics`` = CIDEr + BLEU-4, as in LAVIS. A dataset with ``domains`` (NoCaps: image_id -> in-domain /
near-domain / out-domain) also gets each domain's scores and ``overall`` as nested dicts.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

import registry
from common.dist import is_main_process
from tasks.base_task import BaseTask, call_with_supported_kwargs, id_value
from tasks.metrics.caption import caption_scores, load_coco_caption_gt, write_coco_caption_gt


def caption_references(dataset: Any) -> dict[Any, list[str]]:
    """image_id -> reference captions of a caption evaluation dataset.

    Uses the dataset's ``ground_truth`` mapping when it has one (the datasets package's caption
    eval sets do); otherwise reads ``dataset.annotation`` records, each with an image id
    (``image_id``) and one caption or a list of captions (``caption``). A ConcatDataset
    contributes the references of each part.
    """
    ground_truth = getattr(dataset, "ground_truth", None)
    if isinstance(ground_truth, Mapping):
        return {id_value(k): [str(c) for c in v] for k, v in ground_truth.items()}
    parts = getattr(dataset, "datasets", None)
    if parts is not None:  # torch ConcatDataset
        refs: dict[Any, list[str]] = {}
        for part in parts:
            for k, v in caption_references(part).items():
                refs.setdefault(k, []).extend(v)
        return refs
    annotation = getattr(dataset, "annotation", None)
    if annotation is None:
        raise TypeError(
            f"captioning: cannot find reference captions in {type(dataset).__name__}: it needs a "
            "`ground_truth` mapping image_id -> captions or an `annotation` list of records with 'image_id' and "
            "'caption'; alternatively set run.annotation_file to a COCO caption file"
        )
    refs = {}
    for i, ann in enumerate(annotation):
        if "image_id" not in ann or "caption" not in ann:
            raise KeyError(
                f"captioning: annotation record {i} of {type(dataset).__name__} lacks 'image_id' or "
                f"'caption' (keys: {sorted(ann)}); set run.annotation_file to a COCO caption file instead"
            )
        captions = ann["caption"] if isinstance(ann["caption"], (list, tuple)) else [ann["caption"]]
        refs.setdefault(id_value(ann["image_id"]), []).extend(str(c) for c in captions)
    return refs


@registry.tasks.register("captioning")
class CaptionTask(BaseTask):
    """Caption generation + BLEU / METEOR / ROUGE-L / CIDEr (/ SPICE)."""

    #: run keys this task reads (runners.config validates ``run:`` against them)
    RUN_KEYS = {
        "num_beams": "beam width", "max_len": "max caption tokens", "min_len": "min caption tokens",
        "repetition_penalty": "generation repetition penalty", "length_penalty": "beam length penalty",
        "top_p": "nucleus sampling p", "temperature": "sampling temperature",
        "use_nucleus_sampling": "sample instead of beam search",
        "prompt": "caption prompt; empty = the model's own",
        "annotation_file": "COCO caption ground-truth file (default: built from the eval dataset)",
        "caption_metrics": "subset of Bleu_1..4, METEOR, ROUGE_L, CIDEr, SPICE (default: all)",
        "sample_id_key": "batch key holding the image id (image_id)",
    }

    #: run key (LAVIS name) -> ``generate()`` argument. A key the run leaves out is not passed: the model's
    #: ``generate()`` signature holds the decoding defaults of its family (stage 1: 3 beams, stage 2: 5).
    DECODING_KEYS = {
        "num_beams": "num_beams", "max_len": "max_length", "min_len": "min_length",
        "repetition_penalty": "repetition_penalty", "length_penalty": "length_penalty", "top_p": "top_p",
        "temperature": "temperature", "use_nucleus_sampling": "use_nucleus_sampling",
    }

    def __init__(self, run_cfg=None) -> None:
        super().__init__(run_cfg)
        self.decoding = {arg: self.run_cfg[key] for key, arg in self.DECODING_KEYS.items()
                         if self.run_cfg.get(key) is not None}
        self.prompt: str = self.run_cfg.get("prompt", "") or ""
        self.annotation_file: str | None = self.run_cfg.get("annotation_file")
        metrics = self.run_cfg.get("caption_metrics")
        self.caption_metrics = list(metrics) if metrics is not None else None
        self.sample_id_key: str = self.run_cfg.get("sample_id_key", "image_id")
        self._reference_cache: tuple[Any, dict[Any, list[str]]] | None = None  # (dataset, references)

    def valid_step(self, model: torch.nn.Module, samples: dict) -> list[dict]:
        if self.prompt:
            samples = {**samples, "prompt": self.prompt}
        captions = call_with_supported_kwargs(model.generate, samples, **self.decoding)
        if self.sample_id_key not in samples:
            raise KeyError(f"captioning: batch has no '{self.sample_id_key}' (keys: {sorted(samples)})")
        ids = samples[self.sample_id_key]
        if len(captions) != len(ids):
            raise ValueError(f"captioning: model returned {len(captions)} captions for {len(ids)} images")
        return [{"image_id": id_value(i), "caption": c} for i, c in zip(ids, captions)]

    def references(self, dataset: Any = None) -> Mapping[Any, list[str]]:
        """Reference captions: from ``run.annotation_file`` if set, else from the dataset."""
        if self.annotation_file:
            return {id_value(k): v for k, v in load_coco_caption_gt(self.annotation_file).items()}
        dataset = dataset if dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("captioning: no dataset evaluated yet and no run.annotation_file to score against")
        if self._reference_cache is None or self._reference_cache[0] is not dataset:
            self._reference_cache = (dataset, caption_references(dataset))
        return self._reference_cache[1]

    def domain_scores(self, predictions: Mapping[Any, str], refs: Mapping[Any, list[str]],
                      domains: Mapping[Any, str]) -> dict[str, dict[str, float]]:
        """Scores of each domain's images: ``{domain: {metric: value, "num_images": n}}``."""
        out: dict[str, dict[str, float]] = {}
        for domain in sorted(set(domains.values())):
            ids = [i for i in predictions if domains.get(i) == domain]
            if ids:
                scores = caption_scores({i: predictions[i] for i in ids}, {i: refs[i] for i in ids},
                                        metrics=self.caption_metrics)
                out[domain] = {**scores, "num_images": len(ids)}
        return out

    def after_evaluation(self, results: list[dict], split: str, epoch: Any) -> dict[str, Any]:
        merged = self.merge_results(results, self.result_name(split, epoch), dedup_key="image_id")
        if not self.report_metric:
            return self.unscored(merged, split, epoch)
        metrics = None
        if is_main_process():
            refs = self.references()
            if not self.annotation_file:  # keep the COCO-format ground truth next to the results
                write_coco_caption_gt(refs, self.result_dir / f"{self.result_name(split, epoch, '_gt_coco')}.json")
            predictions = {r["image_id"]: r["caption"] for r in merged}
            metrics = caption_scores(predictions, refs, metrics=self.caption_metrics)
            metrics["num_images"] = len(predictions)
            metrics["agg_metrics"] = metrics.get("CIDEr", 0.0) + metrics.get("Bleu_4", 0.0)
            domains = getattr(self.eval_dataset, "domains", None)  # NoCaps: in-domain / near-domain / out-domain
            if domains:
                overall = {k: v for k, v in metrics.items() if k != "agg_metrics"}
                metrics.update(self.domain_scores(predictions, refs, domains), overall=overall)
        return self.finish_metrics(metrics, split, epoch)
