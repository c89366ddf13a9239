"""Tasks that pre-train the parts BLIP-2 freezes (the demo trains them first, as in the paper).

- ``image_encoder_pretrain``: dense attribute classification (``frozen_image_encoder_pretrain``);
  validation reports per-patch shape/colour/size accuracy.
- ``text_lm_pretrain``: next-token prediction on text (``frozen_lm_pretrain``); validation
  reports the loss.

Both train through the ordinary runner (``python -m runners.train --cfg ...``); afterwards
``export_pretrained(job_dir, out_dir)`` writes the weights in the form real ones come
in (timm ``config.json`` + ``model.safetensors``; Hugging Face ``save_pretrained``), which BLIP-2
then loads through its usual image-encoder and LLM plugins.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

import registry
from tasks.base_task import BaseTask
from tasks.image_text_pretrain import ImageTextPretrainTask

logger = logging.getLogger(__name__)


@registry.tasks.register("text_lm_pretrain")
class TextLMPretrainTask(ImageTextPretrainTask):
    """Causal-LM pre-training of the frozen LLM; validation = mean loss (agg_metrics = -loss)."""


@registry.tasks.register("image_encoder_pretrain")
class ImageEncoderPretrainTask(BaseTask):
    """Dense attribute pre-training of the frozen image encoder; agg_metrics = mean patch accuracy."""

    def valid_step(self, model: torch.nn.Module, samples: dict) -> list[dict]:
        accuracy = model.patch_accuracy(samples)
        return [{"batch_size": int(samples["image"].shape[0]), **accuracy}]

    def after_evaluation(self, results: list[dict], split: str, epoch: Any) -> dict[str, Any]:
        merged = self.merge_results(results, f"{split}_epoch{epoch}_accuracy")
        metrics = None
        if merged is not None:
            if not merged:
                raise ValueError(f"image_encoder_pretrain: no evaluation batches in split '{split}'")
            total = sum(r["batch_size"] for r in merged)
            keys = sorted({k for r in merged for k in r if k != "batch_size"})
            metrics = {k: sum(r[k] * r["batch_size"] for r in merged) / total for k in keys}
            metrics["agg_metrics"] = sum(metrics[k] for k in keys) / len(keys)
        return self.finish_metrics(metrics, split, epoch)


def export_pretrained(job_dir: str | Path, out_dir: str | Path) -> Path:
    """Rebuild the model of a finished pre-training job from the config it ran with (``job_dir/config.yaml``,
    command-line options included), load its last (or best) weights and export them (``model.export(out_dir)``).
    Returns ``out_dir``."""
    from omegaconf import OmegaConf

    from runners import checkpointing as ckpt

    job_dir = Path(job_dir)
    saved = job_dir / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"{saved} is missing: export_pretrained needs the job directory of a finished run")
    cfg = OmegaConf.load(saved)
    model = registry.models.get(cfg.model.arch).from_config(cfg.model)
    best = job_dir / "checkpoint_best"
    source = best if (best / ckpt.MODEL_FILE).is_file() else ckpt.latest_checkpoint(job_dir)
    if source is None:
        raise FileNotFoundError(f"no checkpoint in {job_dir} (expected checkpoint_best/ or checkpoints/step_N/)")
    ckpt.load_trainable_weights(model, source)
    logger.info("exporting %s weights from %s to %s", cfg.model.arch, source, out_dir)
    return model.export(out_dir)
