"""Tasks that pre-train the parts BLIP-2 freezes (the demo trains them first, as in the paper).

- ``image_encoder_pretrain``: dense attribute classification (``frozen_image_encoder_pretrain``);
  validation reports per-patch shape/colour/size accuracy.
- ``text_lm_pretrain``: next-token prediction on text (``frozen_lm_pretrain``); validation
  reports the loss.

Both train through the ordinary runner (``python -m runners.train --cfg ...``); afterwards
``export_pretrained(job_dir, out_dir)`` writes the weights in the form real ones come
in (timm ``config.json`` + ``model.safetensors``; Hugging Face ``save_pretrained``), which BLIP-2
then loads through its usual image-encoder and LLM plugins. ``text_vqa_accuracy`` measures what the
exported LLM can answer from a scene's true description: the ceiling it puts on zero-shot VQA.
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


def text_vqa_accuracy(llm_dir: str | Path, data_root: str | Path, split: str = "test", seed: int = 0,
                      batch_size: int = 100) -> dict[str, float]:
    """VQA accuracy (%) of an exported frozen LLM alone: each question follows one of its image's reference
    captions as text, where BLIP-2 puts the soft visual prompt (the LLM's pre-training format). Greedy answers,
    exact match; ``overall`` and one entry per answer type. A decoder reads "<caption></s>Question: ... Short
    answer:" and stops at a newline; an encoder-decoder reads the caption and prompt and writes the answer."""
    import json
    import random

    import transformers

    from projects.blip2.demo.shapes import seq2seq_pair

    config = transformers.AutoConfig.from_pretrained(llm_dir)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(llm_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm_dir, padding_side="right" if seq2seq else "left")
    ann = Path(data_root) / "annotations"
    captions = {c["image"]: c["caption"] for c in json.loads((ann / f"caption_{split}.json").read_text())}
    types = {a["question_id"]: a["answer_type"]
             for a in json.loads((ann / f"vqa_{split}_annotations.json").read_text())["annotations"]}
    rng = random.Random(seed)
    items = []  # (prompt, answer, answer type)
    for q in json.loads((ann / f"vqa_{split}.json").read_text()):
        refs = captions[q["image"]]
        description = rng.choice(refs if isinstance(refs, list) else [refs])
        prompt = f"{description}</s>Question: {q['question']} Short answer:"
        if seq2seq:
            prompt = seq2seq_pair(f"{prompt} {q['answer'][0]}")[0]
        items.append((prompt, q["answer"][0], types[q["question_id"]]))
    stop = [tokenizer.eos_token_id]
    if not seq2seq:
        stop += tokenizer("\n", add_special_tokens=False).input_ids[-1:]
    right: dict[str, list[bool]] = {}
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            enc = tokenizer([p for p, _, _ in chunk], return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=4, do_sample=False, num_beams=1, eos_token_id=stop,
                                 pad_token_id=tokenizer.pad_token_id)
            new = out if seq2seq else out[:, enc.input_ids.shape[1]:]
            for (_, answer, kind), text in zip(chunk, tokenizer.batch_decode(new, skip_special_tokens=True)):
                right.setdefault(kind, []).append(text.strip().split("\n")[0].strip() == answer)
    if not right:
        raise ValueError(f"no VQA questions in {ann / f'vqa_{split}.json'}")
    scores = {kind: 100.0 * sum(v) / len(v) for kind, v in sorted(right.items())}
    scores["overall"] = 100.0 * sum(sum(v) for v in right.values()) / sum(len(v) for v in right.values())
    return scores
