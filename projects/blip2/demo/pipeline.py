"""The demo's plumbing, shared by both recipes (``run.py``: frozen parts pre-trained here; ``pretrained.py``: real
pre-trained frozen parts): data generation, every training through ``runners.train`` and every evaluation through
``runners.evaluate`` with the demo's project YAMLs, and the output folder."""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

DEMO_DIR = Path(__file__).resolve().parent  # the demo's project YAMLs
MARKER = ".blip2_demo_output"


def say(msg: str) -> None:
    print(msg, flush=True)


class Pipeline:
    """Runs the steps of a recipe in order and records each one's wall time in ``timings``."""

    image_size = 64  # pixels of the generated images

    def __init__(self, out: Path, budget: dict[str, Any], seed: int, extra: Sequence[str] = ()) -> None:
        self.out, self.budget, self.seed, self.extra = out, budget, seed, list(extra)
        self.runs = out / "runs"
        self.feature_cache = out / "feature_cache"  # frozen-encoder outputs shared by stage 1 and stage 2
        self.timings: dict[str, float] = {}

    @property
    def qformer_vocab(self) -> Path:
        return self.out / "qformer_vocab.txt"

    def data_options(self, yaml_name: str) -> list[str]:
        """Same generator settings for every builder (so all read one generated copy)."""
        from omegaconf import OmegaConf

        names = list(OmegaConf.load(DEMO_DIR / yaml_name).datasets.keys())
        opts = []
        for name in names:
            opts += [f"datasets.{name}.generator.seed={self.seed}"]
            opts += [f"datasets.{name}.generator.splits.{k}={v}" for k, v in self.budget["splits"].items()]
        return opts

    def _run(self, module: str, yaml_name: str, options: list[str], extra_args: list[str] = ()) -> dict:
        from runners import evaluate, train

        opts = [f"run.output_dir={self.runs}"] + self.data_options(yaml_name) + options + self.extra
        if module == "train":
            opts.insert(1, f"run.feature_cache_dir={self.feature_cache}")
        argv = ["--cfg", str(DEMO_DIR / yaml_name), *extra_args, "--options", *opts]
        return (train if module == "train" else evaluate).main(argv)

    def train(self, label: str, yaml_name: str, job: str, steps: int, options: list[str]) -> Path:
        say(f"\n== {label} ({steps} steps) ==")
        start = time.time()
        self._run("train", yaml_name, [f"run.job_name={job}", f"run.max_iters={steps}",
                                       f"run.iters_per_inner_epoch={steps}", *options])
        self.timings[job] = time.time() - start
        return self.runs / job

    def checkpoint(self, job: str) -> Path:
        from runners import checkpointing as ckpt

        path = ckpt.latest_checkpoint(self.runs / job)
        if path is None:
            raise FileNotFoundError(f"training job {self.runs / job} wrote no checkpoint")
        return path

    def evaluate(self, label: str, yaml_name: str, job: str, checkpoint: Path, options: list[str]) -> dict:
        say(f"\n== {label} ==")
        start = time.time()
        results = self._run("evaluate", yaml_name, [f"run.job_name={job}", *options],
                            ["--checkpoint", str(checkpoint)])
        self.timings[job] = time.time() - start
        return results["test"]

    def generate_data(self) -> Path:
        import registry

        start = time.time()
        builder = registry.builders.get("shapes_caption")
        cfg = builder.default_config()
        cfg.generator.seed = self.seed
        cfg.generator.splits = dict(self.budget["splits"])
        cfg.generator.image_size = self.image_size
        root = builder(cfg).ensure_generated()
        self.timings["data"] = time.time() - start
        say(f"data: {root} ({self.budget['splits']}, {self.image_size} px)")
        return root

    def drop_feature_cache(self) -> None:
        shutil.rmtree(self.feature_cache, ignore_errors=True)  # ~25 kB per training image; not needed any more


@contextlib.contextmanager
def torch_threads(count: int):
    """Run the block with ``count`` torch threads (0: unchanged), then restore the previous count."""
    import torch

    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def write_qformer_vocab(data_root: Path, path: Path) -> Path:
    """bert-base-uncased's vocab.txt restricted to the special tokens and the tokens of the data set's text.

    Every word of the templates is a whole-word entry of bert-base-uncased, so texts tokenize into the
    same token strings as with the full vocabulary, while the Q-Former's word embeddings and ITG output
    layer shrink from 30523 rows to about 60 (the output layer dominated a stage-1 step's cost on a CPU).
    """
    from models.qformer_init import bundled_bert_vocab, init_tokenizer

    full = Path(bundled_bert_vocab()).read_text(encoding="utf-8").splitlines()
    tokenizer = init_tokenizer(bundled_bert_vocab())
    texts = []
    for split in ("train", "val", "test"):
        for rec in json.loads((data_root / "annotations" / f"caption_{split}.json").read_text()):
            texts += rec["caption"] if isinstance(rec["caption"], list) else [rec["caption"]]
        texts += [q["question"] for q in json.loads((data_root / "annotations" / f"vqa_{split}.json").read_text())]
    used = {t for text in set(texts) for t in tokenizer.tokenize(text)}
    keep = [t for t in full if t in used or t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(keep) + "\n", encoding="utf-8")
    return path


def prepare_out_dir(out: Path) -> None:
    """Create ``out``; a previous demo output there (marked) is replaced, anything else is refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise FileExistsError(f"{out} exists and is not a demo output directory; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by python -m projects.blip2.demo; removed and rewritten on the next run\n")
