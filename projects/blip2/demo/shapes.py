"""`shapes`: a deterministic synthetic vision-language data set for the offline demo (a plugin: registered when
``projects.blip2.demo`` is imported).

Each image shows 1-3 coloured shapes (mostly 2+, so colour must be bound to the right object)
on a plain background. From one seed we write, under ``<cache_root>/shapes/``, the LAVIS
annotation formats the real builders read (caption train, Karpathy-style eval, VQA with an
``answer_list`` and COCO-format question/annotation files) plus ``scenes_<split>.json`` with
the object lists (used by the image-encoder pre-training and the caption attribute metric).
Splits hold disjoint images; eval splits never repeat a scene description, so retrieval has
exactly one right image per caption.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from common.paths import cache_root

logger = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 230),
    "yellow": (235, 215, 30), "purple": (140, 50, 190), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.10, "large": 0.17}  # radius as a fraction of the image side
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128),
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
# share of images with 1, 2, 3 objects
COUNT_WEIGHTS = (0.15, 0.5, 0.35)
DEFAULT_SPLITS = {"train": 4000, "val": 100, "test": 200}
FORMAT_VERSION = 3
CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the builders' default YAMLs


# ---------------------------------------------------------------------------------------------
# scenes
# ---------------------------------------------------------------------------------------------
def sample_scene(rng: random.Random) -> dict[str, Any]:
    """One scene: background and 1-3 objects with distinct shapes and colours, sorted left to right.

    Objects sit in distinct horizontal thirds, so "left of" is never ambiguous.
    """
    n = rng.choices((1, 2, 3), weights=COUNT_WEIGHTS)[0]
    shapes = rng.sample(SHAPES, n)
    colours = rng.sample(list(COLOURS), n)
    slots = sorted(rng.sample(range(3), n))
    objects = []
    for shape, colour, slot in zip(shapes, colours, slots):
        size = rng.choice(list(SIZES))
        r = SIZES[size]
        cx = (slot + 0.5) / 3 + rng.uniform(-1, 1) * max(0.0, 1 / 6 - r - 0.01)
        cy = rng.uniform(r + 0.03, 1 - r - 0.03)
        objects.append({"shape": shape, "colour": colour, "size": size, "x": round(cx, 4), "y": round(cy, 4)})
    return {"background": rng.choice(list(BACKGROUNDS)), "objects": objects}


def scene_key(scene: dict[str, Any]) -> tuple:
    """What a caption can say about a scene (used to keep eval descriptions unique)."""
    return (scene["background"],) + tuple((o["size"], o["colour"], o["shape"]) for o in scene["objects"])


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        s = r * 0.9
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "cross":  # a plus sign: arms of half-width w
        w = r * 0.38
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    return None


def render_scene(scene: dict[str, Any], size: int, label_map: bool = False) -> Image.Image | tuple[Image.Image, Image.Image]:
    """Draw a scene at ``size`` x ``size`` pixels; with ``label_map`` also return an "L" image
    whose pixel value is 1 + the index of the object covering it (0 = background)."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene["background"]])
    labels = Image.new("L", (size, size), 0) if label_map else None
    for i, obj in enumerate(scene["objects"]):
        cx, cy, r = obj["x"] * size, obj["y"] * size, SIZES[obj["size"]] * size
        targets = [(ImageDraw.Draw(img), COLOURS[obj["colour"]])]
        if labels is not None:
            targets.append((ImageDraw.Draw(labels), i + 1))
        for draw, fill in targets:
            poly = _polygon(obj["shape"], cx, cy, r)
            if poly is None:
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            else:
                draw.polygon(poly, fill=fill)
    return (img, labels) if labels is not None else img


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------
def _a(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _np(obj: dict[str, Any], with_size: bool) -> str:
    return _a(f"{obj['size']} {obj['colour']} {obj['shape']}" if with_size else f"{obj['colour']} {obj['shape']}")


def captions_for(scene: dict[str, Any], rng: random.Random, k: int) -> list[str]:
    """``k`` distinct templated captions (fewer if the templates run out), objects named left to right."""
    objs, bg = scene["objects"], scene["background"]
    cands: list[str] = []
    for ws in (True, False):
        p = [_np(o, ws) for o in objs]
        if len(objs) == 1:
            cands += [p[0], f"{p[0]} on a {bg} background", f"there is {p[0]}", f"an image of {p[0]}",
                      f"a picture with {p[0]} in it"]
        elif len(objs) == 2:
            cands += [f"{p[0]} to the left of {p[1]}", f"{p[1]} to the right of {p[0]}", f"{p[0]} and {p[1]}",
                      f"two shapes: {p[0]} on the left and {p[1]} on the right",
                      f"{p[0]} and {p[1]} on a {bg} background"]
        else:
            cands += [f"{p[0]}, {p[1]} and {p[2]}", f"three shapes: {p[0]}, {p[1]} and {p[2]}",
                      f"{p[0]} to the left of {p[1]} and {p[2]}", f"{p[0]}, {p[1]} and {p[2]} from left to right",
                      f"{p[0]}, {p[1]} and {p[2]} on a {bg} background"]
    return rng.sample(cands, min(k, len(cands)))


# The answers a question of each type chooses from (its record's ``choices``: ranked VQA picks among them).
ANSWER_CHOICES = {"color": tuple(COLOURS), "shape": SHAPES, "number": ("1", "2", "3"), "yes/no": ("yes", "no")}


def questions_for(scene: dict[str, Any], rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, answer, answer_type) pairs about colour, shape, count, position and yes/no."""
    objs = scene["objects"]
    qa: list[tuple[str, str, str]] = []
    o = rng.choice(objs)
    qa.append((f"what color is the {o['shape']}?", o["colour"], "color"))
    o = rng.choice(objs)
    qa.append((f"what shape is the {o['colour']} object?", o["shape"], "shape"))
    qa.append(("how many shapes are there?", str(len(objs)), "number"))
    if len(objs) >= 2:
        side, o = rng.choice([("left", objs[0]), ("right", objs[-1])])
        if rng.random() < 0.5:
            qa.append((f"what shape is on the {side}?", o["shape"], "shape"))
        else:
            qa.append((f"what color is the shape on the {side}?", o["colour"], "color"))
    # yes/no about a colour-shape pair: present, or a swapped / absent binding
    o = rng.choice(objs)
    if rng.random() < 0.5:
        qa.append((f"is there {_a(o['colour'] + ' ' + o['shape'])}?", "yes", "yes/no"))
    else:
        present = {(x["colour"], x["shape"]) for x in objs}
        wrong = [c for c in COLOURS if (c, o["shape"]) not in present]
        qa.append((f"is there {_a(rng.choice(wrong) + ' ' + o['shape'])}?", "no", "yes/no"))
    return qa


_PAIR = re.compile(r"\b(" + "|".join(COLOURS) + r")\s+(?:(?:small|large)\s+)?(" + "|".join(SHAPES) + r")s?\b")
_SHAPE = re.compile(r"\b(" + "|".join(SHAPES) + r")s?\b")
_COLOUR = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")


def caption_attributes_correct(caption: str, scene: dict[str, Any]) -> bool:
    """True when the caption names every object with its right colour and no wrong colour/shape.

    Every shape word must be preceded by its colour word (binding), and the (colour, shape)
    pairs must be exactly the scene's objects.
    """
    text = caption.lower()
    pairs = set(_PAIR.findall(text))
    truth = {(o["colour"], o["shape"]) for o in scene["objects"]}
    return (pairs == truth and len(_SHAPE.findall(text)) == len(truth)
            and len(_COLOUR.findall(text)) == len(truth))


# ---------------------------------------------------------------------------------------------
# writing the data set
# ---------------------------------------------------------------------------------------------
def generate(root: str | Path | None = None, seed: int = 0, splits: dict[str, int] | None = None,
             image_size: int = 64, captions_train: int = 3) -> Path:
    """Write the data set under ``root/shapes`` (default: the cache root) unless it is already there.

    A ``meta.json`` records the arguments; a different request regenerates into the same place.
    Returns the data set directory.
    """
    splits = dict(splits or DEFAULT_SPLITS)
    out = Path(root).expanduser() if root is not None else cache_root() / "shapes"
    meta = {"version": FORMAT_VERSION, "seed": seed, "splits": splits, "image_size": image_size,
            "captions_train": captions_train}
    meta_path = out / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        return out
    logger.info("generating the shapes data set into %s", out)
    rng = random.Random(seed)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    next_id, qid = 0, 0
    for split, n in splits.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        seen: set[tuple] = set()
        scenes, caps, vqa_items, answers_by_q = [], [], [], []
        while len(scenes) < n:
            scene = sample_scene(rng)
            if split != "train":
                if scene_key(scene) in seen:
                    continue
                seen.add(scene_key(scene))
            rel = f"{split}/shapes_{next_id:06d}.png"
            render_scene(scene, image_size).save(out / "images" / rel)
            scenes.append({"image": rel, "image_id": next_id, **scene})
            texts = captions_for(scene, rng, captions_train if split == "train" else 5)
            if split == "train":
                caps += [{"image": rel, "caption": t, "image_id": f"shapes_{next_id}"} for t in texts]
            else:
                caps.append({"image": rel, "caption": texts})
            for question, answer, atype in questions_for(scene, rng):
                vqa_items.append({"question_id": qid, "question": question, "answer": [answer] * 10,
                                  "image": rel, "image_id": next_id, "choices": list(ANSWER_CHOICES[atype])})
                answers_by_q.append((qid, next_id, question, answer, atype))
                qid += 1
            next_id += 1
        _dump(out / "annotations" / f"scenes_{split}.json", scenes)
        _dump(out / "annotations" / f"caption_{split}.json", caps)
        _dump(out / "annotations" / f"vqa_{split}.json", vqa_items)
        if split != "train":
            _write_coco_gt(out / "annotations", split, caps, answers_by_q)
    answer_list = sorted(set(COLOURS) | set(SHAPES) | {"1", "2", "3", "yes", "no"})
    _dump(out / "annotations" / "answer_list.json", answer_list)
    meta_path.write_text(json.dumps(meta))
    return out


def _write_coco_gt(ann_dir: Path, split: str, caps: list[dict], qas: list[tuple]) -> None:
    """COCO-format caption ground truth and VQA question/annotation files for an eval split."""
    def img_id(rel: str) -> int:
        return int(Path(rel).stem.split("_")[-1])

    cap_gt = {"images": [{"id": img_id(c["image"])} for c in caps], "annotations": [],
              "info": {"description": f"shapes {split}"}, "licenses": [], "type": "captions"}
    for c in caps:
        for t in c["caption"]:
            cap_gt["annotations"].append({"image_id": img_id(c["image"]), "caption": t,
                                          "id": len(cap_gt["annotations"])})
    _dump(ann_dir / f"caption_{split}_gt.json", cap_gt)
    questions = {"questions": [{"question_id": q, "image_id": i, "question": s} for q, i, s, _, _ in qas],
                 "info": {}, "license": {}, "data_subtype": split, "data_type": "shapes", "task_type": "OpenEnded"}
    annotations = {"annotations": [
        {"question_id": q, "image_id": i, "question_type": t, "answer_type": t, "multiple_choice_answer": a,
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]}
        for q, i, _, a, t in qas], "info": {}, "license": {}, "data_subtype": split, "data_type": "shapes"}
    _dump(ann_dir / f"vqa_{split}_questions.json", questions)
    _dump(ann_dir / f"vqa_{split}_annotations.json", annotations)


def _dump(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def chance_levels(root: str | Path, split: str = "test") -> dict[str, float]:
    """Chance level of each demo metric on ``split`` (in %).

    Retrieval: a random ranking (R@K = K / #images for both directions, since every image has
    the same number of captions). VQA: a guess uniform over the answers of the question's type.
    Captions: a caption whose objects are drawn at random with the right count.
    """
    ann = Path(root) / "annotations"
    scenes = json.loads((ann / f"scenes_{split}.json").read_text())
    qas = json.loads((ann / f"vqa_{split}_annotations.json").read_text())["annotations"]
    n_img = len(scenes)
    per_type = {"color": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "number": 1 / 3, "yes/no": 1 / 2}
    vqa = sum(per_type[q["answer_type"]] for q in qas) / len(qas)
    # all colour+shape words right by chance: ordered distinct colours and shapes of the right count
    def p_correct(n: int) -> float:
        p = 1.0
        for k in range(n):  # unordered set of n pairs: n! orders of the ordered draws match
            p *= (k + 1) / ((len(COLOURS) - k) * (len(SHAPES) - k))
        return p
    caption = sum(p_correct(len(s["objects"])) for s in scenes) / n_img
    levels = {f"{d}_r{k}": 100 * min(1.0, k / n_img) for d in ("txt", "img") for k in (1, 5, 10)}
    levels.update({"vqa_acc": 100 * vqa, "caption_attr_acc": 100 * caption})
    levels.update({f"vqa_acc_{kind}": 100 * p for kind, p in per_type.items()})
    levels.update({f"caption_attr_acc_{n}": 100 * p_correct(n) for n in {len(s["objects"]) for s in scenes}})
    return levels


# ---------------------------------------------------------------------------------------------
# inputs of the frozen-part pre-training (image encoder: dense labels; LLM: text corpus)
# ---------------------------------------------------------------------------------------------
def patch_labels(scene: dict[str, Any], image_size: int, patch_size: int) -> "torch.Tensor":
    """[P, 3] long tensor: (shape, colour, size) class + 1 of the object at each patch centre, 0 = background."""
    import numpy as np
    import torch

    _, labels = render_scene(scene, image_size, label_map=True)
    grid = image_size // patch_size
    centres = np.asarray(labels)[patch_size // 2::patch_size, patch_size // 2::patch_size][:grid, :grid]
    table = np.zeros((len(scene["objects"]) + 1, 3), dtype=np.int64)
    for i, o in enumerate(scene["objects"]):
        table[i + 1] = (SHAPES.index(o["shape"]) + 1, list(COLOURS).index(o["colour"]) + 1,
                        list(SIZES).index(o["size"]) + 1)
    return torch.from_numpy(table[centres.reshape(-1)])


def lm_corpus(root: str | Path, split: str = "train", seed: int = 0, copies: int = 2) -> list[str]:
    """Text the LLM is pre-trained on, built from the training split only.

    Each line is a scene description, then (after ``</s>``, as where BLIP-2 puts the soft visual
    prompt before the text) either another caption of the scene or a question with its short
    answer in the zero-shot VQA prompt format. The LLM thus learns to read facts about a scene
    from what precedes it, which is the role the Q-Former's soft prompt takes over later.
    """
    ann = Path(root) / "annotations"
    rng = random.Random(seed)
    scenes = json.loads((ann / f"scenes_{split}.json").read_text())
    caps: dict[str, list[str]] = {}
    for c in json.loads((ann / f"caption_{split}.json").read_text()):
        texts = c["caption"] if isinstance(c["caption"], list) else [c["caption"]]  # eval splits: 5 per image
        caps.setdefault(c["image"], []).extend(texts)
    qas: dict[str, list[tuple[str, str]]] = {}
    for q in json.loads((ann / f"vqa_{split}.json").read_text()):
        qas.setdefault(q["image"], []).append((q["question"], q["answer"][0]))
    lines = []
    for _ in range(copies):
        for s in scenes:
            texts = caps[s["image"]] + captions_for(s, rng, 3)
            for caption in caps[s["image"]]:
                lines.append(f"{rng.choice(texts)}</s>{caption}\n")
            for q, a in qas[s["image"]]:
                lines.append(f"{rng.choice(texts)}</s>Question: {q} Short answer: {a}\n")
    rng.shuffle(lines)
    return lines


def seq2seq_pair(line: str) -> tuple[str, str]:
    """An ``lm_corpus`` line as (encoder text, decoder target) for an encoder-decoder LLM (T5).

    BLIP-2's T5 encoder reads the soft prompt and then the prompt, and the decoder writes the answer or the
    caption; so the description plus "Question: ... Short answer:" go to the encoder, the rest to the decoder.
    """
    description, sep, rest = line.rstrip("\n").partition("</s>")
    if not sep:
        raise ValueError(f"LLM corpus line without '</s>' between description and continuation: {line!r}")
    if rest.startswith("Question: ") and " Short answer: " in rest:
        question, answer = rest.rsplit(" Short answer: ", 1)
        return f"{description} {question} Short answer:", answer
    return description, rest


# ---------------------------------------------------------------------------------------------
# builders (registered); they generate the data on first use, then read it like real data
# ---------------------------------------------------------------------------------------------
from datasets.base_dataset import BaseDataset, collate_samples  # noqa: E402
from datasets.builders.base_builder import BaseDatasetBuilder  # noqa: E402
from datasets.builders.vqa_builders import VQABuilderBase  # noqa: E402
from datasets.caption_datasets import CaptionDataset, CaptionEvalDataset  # noqa: E402
from datasets.retrieval_datasets import RetrievalDataset, RetrievalEvalDataset  # noqa: E402
from datasets.vqa_datasets import VQADataset, VQAEvalDataset  # noqa: E402

import registry  # noqa: E402


class ShapesSceneDataset(BaseDataset):
    """Scenes (``scenes_<split>.json``) -> ``{"image", "patch_labels" [P,3], "count", "background",
    "image_id"}``: dense labels for pre-training the image encoder (count is objects - 1)."""

    default_fields = {"image": "image"}
    required_fields = ("image", )

    def __init__(self, *args: Any, image_size: int = 64, patch_size: int = 8, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.image_size, self.patch_size = image_size, patch_size
        self._patch_labels: dict[int, Any] = {}  # index -> [P, 3]; drawing the label map costs more than a PNG read

    def media_path(self, ann: dict[str, Any]) -> str:
        return os.path.join(self.vis_root, ann["image"])

    def make_sample(self, ann: dict[str, Any], index: int, media: Any) -> dict[str, Any]:
        import torch

        if index not in self._patch_labels:
            self._patch_labels[index] = patch_labels(ann, self.image_size, self.patch_size)
        return {"image": media, "patch_labels": self._patch_labels[index],
                "count": torch.tensor(len(ann["objects"]) - 1),
                "background": torch.tensor(list(BACKGROUNDS).index(ann["background"])),
                "image_id": ann["image_id"]}


class ShapesTextDataset:
    """Lines of LLM pre-training text (see ``lm_corpus``) -> ``{"text_input": str}``; with ``seq2seq``
    -> ``{"text_input": encoder text, "text_output": decoder target}`` (see ``seq2seq_pair``)."""

    def __init__(self, lines: list[str], seq2seq: bool = False) -> None:
        self.lines = lines
        self.pairs = [seq2seq_pair(line) for line in lines] if seq2seq else None

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.pairs is not None:
            source, target = self.pairs[index]
            return {"text_input": source, "text_output": target, "instance_id": str(index)}
        return {"text_input": self.lines[index], "instance_id": str(index)}

    def collater(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_samples(samples)


class _ShapesMixin:
    """Generates the data set (from ``generator:`` in the config) before the usual build."""

    EXTRA_CONFIG_KEYS = BaseDatasetBuilder.EXTRA_CONFIG_KEYS + ("generator",)

    def data_root(self) -> Path:
        return Path(self.resolve_path("shapes"))

    def ensure_generated(self) -> Path:
        gen = self.config.get("generator") or {}
        splits = {str(k): int(v) for k, v in (gen.get("splits") or DEFAULT_SPLITS).items()}
        return generate(self.data_root(), seed=int(gen.get("seed", 0)), splits=splits,
                        image_size=int(gen.get("image_size", 64)),
                        captions_train=int(gen.get("captions_train", 3)))

    def build_datasets(self):  # type: ignore[override]
        self.ensure_generated()
        return super().build_datasets()


@registry.builders.register("shapes_caption")
class ShapesCaptionBuilder(_ShapesMixin, BaseDatasetBuilder):
    """Captions: train one caption per record; val/test Karpathy style (5 per image)."""

    train_dataset_cls = CaptionDataset
    eval_dataset_cls = CaptionEvalDataset
    DATASET_CONFIG_DICT = {"default": str(CONFIG_DIR / "shapes_caption.yaml")}


@registry.builders.register("shapes_retrieval")
class ShapesRetrievalBuilder(_ShapesMixin, BaseDatasetBuilder):
    """Image-text retrieval on the same caption files (eval: 5 captions per image)."""

    train_dataset_cls = RetrievalDataset
    eval_dataset_cls = RetrievalEvalDataset
    DATASET_CONFIG_DICT = {"default": str(CONFIG_DIR / "shapes_retrieval.yaml")}


@registry.builders.register("shapes_vqa")
class ShapesVQABuilder(_ShapesMixin, VQABuilderBase):
    """VQA (colour, shape, count, position, yes/no) with answer_list and COCO-format eval files."""

    train_dataset_cls = VQADataset
    eval_dataset_cls = VQAEvalDataset
    DATASET_CONFIG_DICT = {"default": str(CONFIG_DIR / "shapes_vqa.yaml")}


@registry.builders.register("shapes_scenes")
class ShapesScenesBuilder(_ShapesMixin, BaseDatasetBuilder):
    """Images with dense attribute labels, for the image-encoder pre-training (``patch_size`` key)."""

    train_dataset_cls = ShapesSceneDataset
    eval_dataset_cls = ShapesSceneDataset
    DATASET_CONFIG_DICT = {"default": str(CONFIG_DIR / "shapes_scenes.yaml")}
    EXTRA_CONFIG_KEYS = _ShapesMixin.EXTRA_CONFIG_KEYS + ("patch_size",)

    def dataset_kwargs(self, split: str, is_train: bool) -> dict[str, Any]:
        gen = self.config.get("generator") or {}
        return {**super().dataset_kwargs(split, is_train), "image_size": int(gen.get("image_size", 64)),
                "patch_size": int(self.config.get("patch_size", 8))}


@registry.builders.register("shapes_text")
class ShapesTextBuilder(_ShapesMixin, BaseDatasetBuilder):
    """LLM pre-training text from the training split (captions and question-answer lines)."""

    DATASET_CONFIG_DICT = {"default": str(CONFIG_DIR / "shapes_text.yaml")}
    EXTRA_CONFIG_KEYS = _ShapesMixin.EXTRA_CONFIG_KEYS + ("copies", "text_format")
    TEXT_FORMATS = ("causal", "seq2seq")

    def build_datasets(self):  # type: ignore[override]
        text_format = str(self.config.get("text_format", "causal"))
        if text_format not in self.TEXT_FORMATS:
            raise ValueError(f"datasets.shapes_text.text_format must be one of {self.TEXT_FORMATS}, "
                             f"got {text_format!r}")
        root = self.ensure_generated()
        lines = lm_corpus(root, "train", seed=int((self.config.get("generator") or {}).get("seed", 0)),
                          copies=int(self.config.get("copies", 2)))
        return {"train": ShapesTextDataset(lines, seq2seq=text_format == "seq2seq")}
