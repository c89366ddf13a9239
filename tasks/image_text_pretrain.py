"""``image_text_pretrain``: both BLIP-2 pre-training stages (the model's forward defines the losses).

Training is the base task's ``train_step``. Evaluation is optional: with validation splits
configured, it reports the mean validation loss of each loss term, and ``agg_metrics`` is the
negated total loss so that "higher is better" holds for checkpoint selection as for the other
tasks.
"""
from __future__ import annotations

from typing import Any

import torch

import registry
from tasks.base_task import BaseTask


@registry.tasks.register("image_text_pretrain")
class ImageTextPretrainTask(BaseTask):
    """Stage 1 (ITC + ITM + ITG) and stage 2 (LM loss through the frozen LLM) pre-training."""

    def valid_step(self, model: torch.nn.Module, samples: dict) -> list[dict]:
        output = model(samples)
        batch = len(samples["text_input"]) if "text_input" in samples else int(samples["image"].shape[0])
        record = {"batch_size": batch}
        for key, value in output.items():
            if "loss" in key and isinstance(value, torch.Tensor) and value.numel() == 1:
                record[key] = float(value)
        return [record]

    def after_evaluation(self, results: list[dict], split: str, epoch: Any) -> dict[str, Any]:
        merged = self.merge_results(results, self.result_name(split, epoch, "_loss"))
        metrics = None
        if merged is not None:
            if not merged:
                raise ValueError(f"image_text_pretrain: no validation batches in split '{split}'")
            total = sum(r["batch_size"] for r in merged)
            keys = sorted({k for r in merged for k in r if k != "batch_size"})
            metrics = {k: sum(r[k] * r["batch_size"] for r in merged if k in r) / total for k in keys}
            metrics["num_samples"] = total
            metrics["agg_metrics"] = -metrics["loss"]
        return self.finish_metrics(metrics, split, epoch)
