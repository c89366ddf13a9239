"""Small on-disk fixture trees in the LAVIS layout, for tests of datasets, tasks and runners.

``make_lavis_tree(root)`` writes real JPEG/PNG images drawn with PIL, annotation files in the
exact LAVIS formats at the storage paths of the default dataset YAMLs (so a builder only needs
``cache_root: root``), MSR-VTT mp4 clips when imageio's ffmpeg is available, and webdataset
shards written with ``webdataset.TarWriter``. Everything is seeded and takes well under a second.
"""
from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

CAPTION_WORDS = ("red", "blue", "green", "cat", "dog", "ball", "tree", "car", "on", "the", "grass", "street")


def draw_image(path: str | Path, seed: int, size: tuple[int, int] = (40, 32)) -> Path:
    """A seeded picture (background + a rectangle and an ellipse); format from the suffix (.jpg/.png)."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    w, h = size
    draw.rectangle([rng.randrange(w // 2), rng.randrange(h // 2), w - 1, h - 1], fill=tuple(rng.randrange(256) for _ in range(3)))
    draw.ellipse([0, 0, rng.randrange(w // 3, w), rng.randrange(h // 3, h)], outline=(255, 255, 255))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def write_corrupt_image(path: str | Path, kind: str = "truncated") -> Path:
    """An unreadable image: ``truncated`` (the first 60 bytes of a real JPEG) or ``garbage`` bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "truncated":
        buf = io.BytesIO()
        Image.new("RGB", (40, 32), (10, 200, 30)).save(buf, format="JPEG")
        path.write_bytes(buf.getvalue()[:60])
    else:
        path.write_bytes(b"this is not an image at all")
    return path


def write_video(path: str | Path, seed: int, n_frames: int = 12, size: int = 32) -> bool:
    """An mp4 whose frame t has brightness 20 * t (so tests can tell which frames were read).

    Returns False when imageio with ffmpeg is not installed (callers skip video tests then).
    """
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401
        import numpy as np
    except ImportError:
        return False
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tint = rng.integers(0, 40, size=3)
    frames = [np.clip(np.full((size, size, 3), 20 * t, dtype=np.int64) + tint, 0, 255).astype("uint8") for t in range(n_frames)]
    imageio.mimwrite(str(path), frames, fps=4, codec="libx264", quality=10, macro_block_size=16)
    return True


def write_shards(directory: str | Path, n_shards: int = 3, per_shard: int = 4, seed: int = 0,
                 corrupt: tuple[str, ...] = ()) -> str:
    """Webdataset tars ``{00000..n-1}.tar`` of ``{key}.jpg`` + ``{key}.json`` ({"caption"}); returns the brace pattern.

    Keys listed in ``corrupt`` get undecodable image bytes.
    """
    import webdataset as wds

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for s in range(n_shards):
        with wds.TarWriter(str(directory / f"{s:05d}.tar")) as sink:
            for i in range(per_shard):
                key = f"s{s:02d}_{i:03d}"
                buf = io.BytesIO()
                Image.new("RGB", (40, 32), tuple(rng.randrange(256) for _ in range(3))).save(buf, format="JPEG")
                data = b"garbage" if key in corrupt else buf.getvalue()
                caption = " ".join(rng.choice(CAPTION_WORDS) for _ in range(5))
                sink.write({"__key__": key, "jpg": data, "json": {"caption": caption, "key": key}})
    return str(directory / ("{00000..%05d}.tar" % (n_shards - 1)))


def _caption(rng: random.Random) -> str:
    return "A " + " ".join(rng.choice(CAPTION_WORDS) for _ in range(rng.randint(3, 7))) + "."


def _dump(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _coco_tree(root: Path, rng: random.Random, paths: dict[str, Any]) -> None:
    """COCO images + Karpathy caption/retrieval files + VQAv2 and OK-VQA files."""
    train = [f"train2014/COCO_train2014_{i:012d}.jpg" for i in (9, 25, 30, 34)]
    val = [f"val2014/COCO_val2014_{i:012d}.jpg" for i in (42, 73, 74, 133)]
    for k, rel in enumerate(train + val):
        draw_image(root / "coco/images" / rel, seed=k)
    ann = root / "coco/annotations"
    _dump(ann / "coco_karpathy_train.json", [
        {"image": rel, "caption": _caption(rng), "image_id": f"coco_{int(rel[-10:-4])}"}
        for rel in train for _ in range(2)])
    _dump(ann / "coco_karpathy_val.json", [{"image": rel, "caption": [_caption(rng) for _ in range(5)]} for rel in val[:2]])
    _dump(ann / "coco_karpathy_test.json", [{"image": rel, "caption": [_caption(rng) for _ in range(5)]} for rel in val[2:]])
    answers = ["yes", "no", "2", "red", "dog"]

    def vqa_records(images: list[str], start: int, with_answers: bool = True) -> list[dict[str, Any]]:
        out = []
        for k, rel in enumerate(images):
            rec = {"question_id": start + k, "question": f"What is in picture {k}?", "image": rel}
            if with_answers:
                rec["answer"] = [rng.choice(answers) for _ in range(10)]
            out.append(rec)
        return out

    _dump(ann / "vqa_train.json", vqa_records(train, 1000))
    _dump(ann / "vqa_val.json", vqa_records(val[:2], 2000))
    val_eval = vqa_records(val, 3000)
    _dump(ann / "vqa_val_eval.json", val_eval)
    _dump(ann / "vqa_test.json", vqa_records(val, 4000, with_answers=False))
    _dump(ann / "answer_list.json", answers)
    qfile, afile = _coco_vqa_files(val_eval)
    _dump(ann / "v2_OpenEnded_mscoco_val2014_questions.json", qfile)
    _dump(ann / "v2_mscoco_val2014_annotations.json", afile)
    ok = root / "okvqa/annotations"
    _dump(ok / "okvqa_train.json", vqa_records(train, 5000))
    ok_eval = vqa_records(val, 6000)
    _dump(ok / "vqa_val_eval.json", ok_eval)
    _dump(ok / "answer_list.json", answers)
    qfile, afile = _coco_vqa_files(ok_eval)
    _dump(ok / "OpenEnded_mscoco_val2014_questions.json", qfile)
    _dump(ok / "mscoco_val2014_annotations.json", afile)
    paths.update(coco_train_images=train, coco_val_images=val, vqa_answers=answers)


def _coco_vqa_files(records: list[dict[str, Any]]) -> tuple[dict, dict]:
    """Official-format question and annotation files for VQA records."""
    questions, annotations = [], []
    for r in records:
        image_id = int(r["image"][-10:-4])
        questions.append({"question_id": r["question_id"], "image_id": image_id, "question": r["question"]})
        annotations.append({
            "question_id": r["question_id"], "image_id": image_id, "question_type": "what is",
            "answer_type": "other", "multiple_choice_answer": max(set(r["answer"]), key=r["answer"].count),
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(r["answer"])],
        })
    return {"questions": questions, "data_subtype": "val2014"}, {"annotations": annotations, "data_subtype": "val2014"}


def _other_image_trees(root: Path, rng: random.Random) -> None:
    """Flickr30k, NoCaps, GQA, VG, SBU, CC3M/12M and the generic-builder data."""
    flickr = [f"flickr30k-images/{1000092795 + i}.jpg" for i in range(6)]
    for k, rel in enumerate(flickr):
        draw_image(root / "flickr30k/images" / rel, seed=100 + k)
    fa = root / "flickr30k/annotations"
    _dump(fa / "train.json", [{"image": rel, "caption": _caption(rng), "image_id": f"fl_{k}"}
                              for k, rel in enumerate(flickr[:4]) for _ in range(2)])
    _dump(fa / "val.json", [{"image": flickr[4], "caption": [_caption(rng) for _ in range(5)]}])
    _dump(fa / "test.json", [{"image": rel, "caption": [_caption(rng) for _ in range(5)]} for rel in flickr[4:]])

    nocaps = ["val/0013ea2087020901.jpg", "val/00223fe4b1d4ce76.png", "test/01a9c2b64b1e9f4c.jpg"]
    for k, rel in enumerate(nocaps):
        draw_image(root / "nocaps/images" / rel, seed=200 + k)
    na = root / "nocaps/annotations"
    _dump(na / "nocaps_val.json", [{"image": rel, "img_id": k, "caption": [_caption(rng) for _ in range(10)]}
                                   for k, rel in enumerate(nocaps[:2])])
    _dump(na / "nocaps_test.json", [{"image": nocaps[2], "img_id": 0}])
    _dump(root / "nocaps/download/nocaps_val_4500_captions.json",  # official image info (domains)
          {"images": [{"id": 0, "domain": "in-domain"}, {"id": 1, "domain": "out-domain"}]})

    gqa = [f"n{161313 + k}.jpg" for k in range(4)]
    for k, rel in enumerate(gqa):
        draw_image(root / "gqa/images" / rel, seed=300 + k)
    ga = root / "gqa/annotations"
    gqa_answers = ["left", "yes", "table", "no"]
    recs = [{"image": rel, "question": f"Is the object number {k} on the left?", "question_id": f"0{k}1234",
             "answer": gqa_answers[k]} for k, rel in enumerate(gqa)]
    _dump(ga / "train_balanced_questions.json", recs)
    _dump(ga / "testdev_balanced_questions.json", recs[:2])
    _dump(ga / "val_balanced_questions.json", recs[2:])
    _dump(ga / "test_balanced_questions.json", [{k: v for k, v in r.items() if k != "answer"} for r in recs[:2]])

    def pairs(folder: str, names: list[str], seed: int) -> list[dict[str, Any]]:
        for k, rel in enumerate(names):
            draw_image(root / folder / rel, seed=seed + k)
        return [{"image": rel, "caption": _caption(rng)} for rel in names]

    _dump(root / "vg/annotations/vg_caption.json",
          pairs("vg/images", ["VG_100K/1.jpg", "VG_100K/2.jpg", "VG_100K_2/3.png"], 400) * 2)
    _dump(root / "sbu_captions/annotations/sbu.json", pairs("sbu_captions/images", ["0.jpg", "1.jpg", "2.jpg"], 500))
    _dump(root / "conceptual_caption/annotations/cc3m.json",
          pairs("conceptual_caption/images", ["00000/000000001.jpg", "00000/000000002.jpg", "00000/000000003.jpg"], 600))
    _dump(root / "conceptual_caption/annotations/cc12m.json",
          pairs("conceptual_caption/images_12m", ["00000/000000001.jpg", "00000/000000002.jpg"], 700))

    # generic builders: CSV with user field names, JSONL for VQA
    mine = ["cats/a.jpg", "cats/b.png", "dogs/c.jpg", "dogs/d.jpg"]
    for k, rel in enumerate(mine):
        draw_image(root / "my_pairs/images" / rel, seed=800 + k)
        draw_image(root / "my_vqa/images" / rel, seed=900 + k)
    pa = root / "my_pairs/annotations"
    pa.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.csv", mine), ("val.csv", mine[:2])):
        with open(pa / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file_name", "text"])
            for rel in rows:
                w.writerow([rel, _caption(rng)])
    va = root / "my_vqa/annotations"
    va.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", mine), ("val.jsonl", mine[2:])):
        with open(va / name, "w") as f:
            for k, rel in enumerate(rows):
                f.write(json.dumps({"img": rel, "q": f"how many things {k}?", "a": ["1", "2", "2"], "qid": 70 + k}) + "\n")
    _dump(va / "answer_list.json", ["1", "2", "3"])


def _msrvtt_tree(root: Path, rng: random.Random) -> bool:
    ok = all(write_video(root / "msrvtt/videos" / f"video{k}.mp4", seed=k) for k in range(4))
    ann = root / "msrvtt/annotations"
    _dump(ann / "cap_train.json", [{"video": f"video{k}.mp4", "caption": _caption(rng)} for k in range(3) for _ in range(2)])
    _dump(ann / "cap_val.json", [{"video": "video3.mp4", "caption": _caption(rng)} for _ in range(3)])
    _dump(ann / "cap_test.json", [{"video": "video3.mp4", "caption": [_caption(rng) for _ in range(3)]}])
    qa = [{"video": f"video{k}.mp4", "question": f"what is shown {k}?", "answer": ["man", "car", "dog", "man"][k],
           "question_id": k} for k in range(4)]
    _dump(ann / "qa_train.json", qa[:3])
    _dump(ann / "qa_val.json", qa[3:])
    _dump(ann / "qa_test.json", qa[2:])
    _dump(ann / "qa_ans2label.json", {"man": 0, "car": 1, "dog": 2})
    return ok


def make_lavis_tree(root: str | Path, seed: int = 0, with_video: bool = True, with_shards: bool = True) -> dict[str, Any]:
    """Write the whole fixture tree under ``root`` (used as every builder's ``cache_root``).

    Returns ``{"root", "coco_train_images", "coco_val_images", "vqa_answers", "has_video",
    "laion_pattern"}``; ``has_video`` is False when no mp4 encoder is installed.
    """
    root = Path(root)
    rng = random.Random(seed)
    paths: dict[str, Any] = {"root": str(root)}
    _coco_tree(root, rng, paths)
    _other_image_trees(root, rng)
    paths["has_video"] = _msrvtt_tree(root, rng) if with_video else False
    paths["laion_pattern"] = write_shards(root / "laion/shards", seed=seed) if with_shards else None
    return paths


def builder_config(name: str, root: str | Path, type: str = "default", **overrides: Any):  # noqa: A002
    """The default config of builder ``name`` with ``cache_root=root`` and ``overrides`` merged in."""
    from omegaconf import OmegaConf

    import registry

    cfg = registry.builders.get(name).default_config(type)
    return OmegaConf.merge(cfg, {"cache_root": str(root), **overrides})
