"""The demo's scoring and reporting: caption attribute accuracy, the metric table, loss curves, the caption grid."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

def read_result(job_dir: Path, split: str, dataset: str = "shapes_caption") -> list[dict]:
    """The captioning task's merged result file: ``result/<dataset>_<split>_epocheval.json``
    (``result/<split>_epocheval.json`` from runners that do not prefix the dataset name)."""
    for path in (job_dir / "result" / f"{dataset}_{split}_epocheval.json",
                 job_dir / "result" / f"{split}_epocheval.json"):
        if path.is_file():
            return json.loads(path.read_text())
    found = sorted(p.name for p in (job_dir / "result").glob("*.json"))
    raise FileNotFoundError(f"caption results of {dataset}/{split} not found in {job_dir / 'result'} "
                            f"(result files: {found})")


def caption_attribute_accuracies(data_root: Path, captions: list[dict], split: str = "test") -> dict[str, float]:
    """``caption_attr_acc`` (all captions) and ``caption_attr_acc_<n>`` (images with n objects), in %."""
    from projects.blip2.demo.shapes import caption_attributes_correct

    scenes = {s["image_id"]: s for s in json.loads((data_root / "annotations" / f"scenes_{split}.json").read_text())}
    if not captions:
        raise ValueError("no captions to score")
    by_count: dict[int, list[bool]] = {}
    for c in captions:
        scene = scenes[int(c["image_id"])]
        by_count.setdefault(len(scene["objects"]), []).append(caption_attributes_correct(c["caption"], scene))
    scores = {f"caption_attr_acc_{n}": 100.0 * sum(v) / len(v) for n, v in sorted(by_count.items())}
    scores["caption_attr_acc"] = 100.0 * sum(sum(v) for v in by_count.values()) / len(captions)
    return scores


ROWS = [
    ("txt_r1", "image->text R@1, ITM re-ranked"),
    ("txt_r5", "image->text R@5, ITM re-ranked"),
    ("txt_r10", "image->text R@10, ITM re-ranked"),
    ("img_r1", "text->image R@1, ITM re-ranked"),
    ("img_r5", "text->image R@5, ITM re-ranked"),
    ("img_r10", "text->image R@10, ITM re-ranked"),
    ("itc_txt_r1", "image->text R@1, ITC only"),
    ("itc_txt_r5", "image->text R@5, ITC only"),
    ("itc_img_r1", "text->image R@1, ITC only"),
    ("itc_img_r5", "text->image R@5, ITC only"),
    ("Bleu_4", "caption BLEU-4"),
    ("CIDEr", "caption CIDEr"),
    ("caption_attr_acc", "captions, colours+shapes all right %"),
    ("caption_attr_acc_1", "  images with 1 object"),
    ("caption_attr_acc_2", "  images with 2 objects"),
    ("caption_attr_acc_3", "  images with 3 objects"),
    ("itg_caption_attr_acc", "captions all right, stage-1 Q-Former alone (ITG) %"),
    ("vqa_acc", "VQA accuracy %"),
    ("vqa_acc_color", "  colour questions"),
    ("vqa_acc_shape", "  shape questions"),
    ("vqa_acc_number", "  count questions"),
    ("vqa_acc_yes/no", "  yes/no questions"),
    ("llm_text_vqa_acc", "VQA by the frozen LLM from the true description %"),
    ("llm_text_vqa_acc_color", "  colour questions"),
    ("llm_text_vqa_acc_shape", "  shape questions"),
    ("llm_text_vqa_acc_number", "  count questions"),
    ("llm_text_vqa_acc_yes/no", "  yes/no questions"),
]
VQA_TYPES = ("color", "shape", "number", "yes/no")  # answer types of the shapes VQA data (shapes.questions_for)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}" if isinstance(v, (int, float)) else str(v)


def metric_table(metrics: dict[str, dict], chance: dict[str, float],
                 reference: dict[str, Any] | None = None) -> str:
    """Text table: metric | BLIP-2 (| without stage 1) | chance (| ``reference["label"]``: ``reference["metrics"]``,
    e.g. the figures of an earlier run)."""
    cols = [c for c in ("blip2", "no_stage1") if c in metrics]
    head = ["metric", *({"blip2": "BLIP-2 demo", "no_stage1": "no stage 1"}[c] for c in cols), "chance"]
    if reference:
        head.append(reference["label"])
    rows = []
    for key, label in ROWS:
        values = [metrics[c].get(key) for c in cols]
        if all(v is None for v in values):
            continue
        scale = 100.0 if key in ("Bleu_4", "CIDEr") else 1.0
        values = [None if v is None else v * scale for v in values]
        label = label + (" (x100)" if scale == 100.0 else "")
        level = chance.get(key.removeprefix("itc_").removeprefix("itg_").removeprefix("llm_text_"),
                           0.0 if scale == 100.0 else None)
        row = [label, *map(_fmt, values), _fmt(level)]
        if reference:
            ref = reference["metrics"].get(key)
            row.append(_fmt(None if ref is None else ref * scale))
        rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(head), "-" * (sum(widths) + 2 * len(widths) - 2), *map(line, rows)])


def loss_curves(runs: Path, jobs: Sequence[str], out: Path) -> list[Path]:
    """One PNG per training job: training loss (and its terms) against the step, from log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for job in jobs:
        log = runs / job / "log.jsonl"
        if not log.is_file():
            continue
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r.get("type") == "train_step"]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        keys = [k for k in rows[0] if k.startswith("loss")]
        for key in keys:
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key, lw=1.5 if key == "loss" else 1)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.set_title(job)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"loss_{job}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _save_text_figure(fig, path: Path) -> None:
    """Lay out and write a figure whose titles are model output: a generated text may hold characters (any script the
    LLM's vocabulary has) that matplotlib's font lacks; they are drawn as boxes without a warning per glyph."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
        fig.tight_layout()
        fig.savefig(path, dpi=90)


def caption_grid(data_root: Path, captions: list[dict], path: Path, n: int = 12) -> Path:
    """PNG grid of held-out images with their generated captions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    scenes = {s["image_id"]: s for s in json.loads((data_root / "annotations" / "scenes_test.json").read_text())}
    chosen = sorted(captions, key=lambda c: int(c["image_id"]))[:n]
    cols = 4
    fig, axes = plt.subplots((len(chosen) + cols - 1) // cols, cols, figsize=(3.2 * cols, 3.4 * ((len(chosen) + 3) // 4)))
    for ax, c in zip(axes.flat, chosen):
        scene = scenes[int(c["image_id"])]
        ax.imshow(Image.open(data_root / "images" / scene["image"]).resize((128, 128), Image.NEAREST))
        ax.set_title("\n".join(_wrap(c["caption"], 34)), fontsize=8, parse_math=False)  # "$" is a character
    for ax in axes.flat:
        ax.axis("off")
    _save_text_figure(fig, path)
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return lines + [cur]


def examples(data_root: Path, captions: list[dict], k: int = 5) -> str:
    """Five held-out images: generated caption vs the references."""
    refs = {}
    for rec in json.loads((data_root / "annotations" / "caption_test.json").read_text()):
        refs[int(Path(rec["image"]).stem.split("_")[-1])] = rec["caption"]
    out = []
    for c in sorted(captions, key=lambda c: int(c["image_id"]))[:k]:
        image_id = int(c["image_id"])
        out.append(f"image {image_id}:\n  generated: {c['caption']}\n  reference: {refs[image_id][0]}\n"
                   f"  reference: {refs[image_id][1]}")
    return "\n".join(out)


def instruction_grid(rows: list[dict[str, str]], path: Path, width: int = 40) -> Path:
    """PNG like the paper's Figure 4: each image once, with every instruction given to it and the model's answer."""
    fig = instruction_figure(rows, width)  # selects the Agg backend before pyplot is imported
    _save_text_figure(fig, path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def instruction_figure(rows: list[dict[str, str]], width: int = 40):
    """The figure of ``instruction_grid``: rows of images, each with a row of its instructions and answers below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    images = list(dict.fromkeys(r["image"] for r in rows))
    labels = {image: [] for image in images}
    for r in rows:
        labels[r["image"]] += _wrap(f"> {r['instruction']}", width) + _wrap(f"  {r['answer']}", width)
    cols = 4
    nrows = (len(images) + cols - 1) // cols
    # under each row of images a row of text, tall enough for the longest (7-pt lines, about 0.13 inch each)
    text_height = 0.13 * max(len(lines) for lines in labels.values()) + 0.1
    fig, axes = plt.subplots(2 * nrows, cols, figsize=(3.6 * cols, (3.4 + text_height) * nrows), squeeze=False,
                             gridspec_kw={"height_ratios": [3.4, text_height] * nrows})
    for ax in axes.flat:
        ax.axis("off")
    for i, image in enumerate(images):
        image_ax, text_ax = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        image_ax.imshow(Image.open(image).convert("RGB").resize((160, 160)))
        text_ax.text(0.0, 1.0, "\n".join(labels[image]), fontsize=7, va="top", ha="left",
                     transform=text_ax.transAxes, parse_math=False)  # generated text, not mathtext
    return fig
