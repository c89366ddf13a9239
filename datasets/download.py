"""Fetch public datasets into the layout the default dataset YAMLs expect.

    python -m datasets.download NAME --root DIR [--dry-run] [--annotations-only] [--tsv FILE]

NAME: coco, flickr30k, nocaps, vqav2, okvqa, gqa, vg, sbu, cc3m, cc12m, msrvtt (and laion, which
only prints the img2dataset recipe). ``DIR`` is the cache root (the builders' ``cache_root``,
default ``$BLIP2_CACHE_ROOT`` or ``~/.cache/blip2``). Annotation URLs and storage paths are read
from the builders' default YAMLs, so the download and the builders can never disagree. Existing
files are kept (re-running resumes). ``--dry-run`` prints the plan without touching the network.
Files arrive through ``torch.hub.download_url_to_file`` (atomic rename; it checks a sha256 prefix, but the dataset
YAMLs, like LAVIS's, carry none); only archive extraction is hand-written (see ``extract``).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from common.paths import cache_root

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

COCO_ZIPS = [f"http://images.cocodataset.org/zips/{n}.zip" for n in ("train2014", "val2014", "test2015")]
GQA_IMAGES = "https://downloads.cs.stanford.edu/nlp/data/gqa/images.zip"
VG_ZIPS = ["https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip",
           "https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip"]
NOCAPS_IMAGE_INFO = {"val": "https://nocaps.s3.amazonaws.com/nocaps_val_4500_captions.json",
                     "test": "https://s3.amazonaws.com/nocaps/nocaps_test_image_info.json"}
MSRVTT_ZIP = "https://www.robots.ox.ac.uk/~maxbain/frozen-in-time/data/MSRVTT.zip"
CC3M_PAGE = "https://ai.google.com/research/ConceptualCaptions/download"
CC12M_TSV = "https://storage.googleapis.com/conceptual_12m/cc12m.tsv"
FLICKR_PAGE = "https://shannon.cs.illinois.edu/DenotationGraph/"


@dataclass(frozen=True)
class Fetch:
    """Download ``url`` to ``root/dest``; archives are then unpacked into ``root/extract_to``."""

    url: str
    dest: str
    extract_to: str | None = None


@dataclass
class Plan:
    name: str
    fetches: list[Fetch] = field(default_factory=list)
    steps: list[tuple[str, Callable[[str], None]]] = field(default_factory=list)  # (description, fn(root))
    notes: list[str] = field(default_factory=list)


# -- network (tests replace this) ------------------------------------------------------------------
def fetch_url(url: str, dest: str) -> None:
    """``url`` into ``dest`` with ``torch.hub.download_url_to_file`` (a temporary file renamed when complete, so
    no half-written file survives a failure)."""
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    torch.hub.download_url_to_file(url, dest, progress=False)


def extract(archive: str, target: str) -> None:
    """Unpack a zip or tar archive. Hand-written because ``torchvision.datasets.utils.extract_archive`` extracts
    tars without the ``data`` filter, which lets an archive write outside ``target``."""
    os.makedirs(target, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            z.extractall(target)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            t.extractall(target, filter="data")
    else:
        raise ValueError(f"{archive} is neither a zip nor a tar archive")


# -- plans -----------------------------------------------------------------------------------------
def annotation_fetches(*yaml_files: str) -> list[Fetch]:
    """Every (url, storage) pair in the given default YAMLs, including answer lists and VQA files."""
    out: list[Fetch] = []
    for name in yaml_files:
        cfg = OmegaConf.load(os.path.join(CONFIG_DIR, name))
        for node in cfg.datasets.values():
            for split in (node.build_info.get("annotations") or {}).values():
                for entry in [split, *[v for v in split.values() if isinstance(v, DictConfig)]]:
                    urls, stores = _as_list(entry.get("url")), _as_list(entry.get("storage"))
                    out.extend(Fetch(u, s) for u, s in zip(urls, stores) if u)
    return list(dict.fromkeys(out))  # de-duplicate, keep order


def _as_list(v: object) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, ListConfig)) else [v]


def _coco_images() -> list[Fetch]:
    return [Fetch(u, f"coco/download/{os.path.basename(u)}", "coco/images") for u in COCO_ZIPS]


def download_url_list(records: list[tuple[str, str]], threads: int = 16) -> int:
    """Fetch (url, dest) pairs in parallel, skipping existing files and failures; returns #fetched."""
    todo = [(u, d) for u, d in records if not os.path.exists(d)]

    def one(pair: tuple[str, str]) -> bool:
        try:
            fetch_url(*pair)
            return True
        except Exception as e:  # noqa: BLE001 (dead links are normal for web-scale sets)
            print(f"  failed {pair[0]}: {e}", file=sys.stderr)
            return False

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, todo))


def tsv_to_annotations(tsv: str, out_json: str, image_dir: str, caption_first: bool) -> list[tuple[str, str]]:
    """Conceptual Captions TSV -> annotation JSON ``[{"image", "caption", "url"}]``; returns (url, dest) pairs.

    CC3M rows are ``caption<TAB>url``; CC12M rows are ``url<TAB>caption``.
    """
    records, pairs = [], []
    with open(tsv, encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)):
            if len(row) < 2:
                continue
            caption, url = (row[0], row[1]) if caption_first else (row[1], row[0])
            rel = f"{i // 10000:05d}/{i:09d}.jpg"
            records.append({"image": rel, "caption": caption, "url": url})
            pairs.append((url, os.path.join(image_dir, rel)))
    os.makedirs(os.path.dirname(out_json), exist_ok=True)
    with open(out_json, "w", encoding="utf-8") as f:
        json.dump(records, f)
    return pairs


def _sbu_images(root: str) -> None:
    with open(os.path.join(root, "sbu_captions/annotations/sbu.json"), encoding="utf-8") as f:
        records = json.load(f)
    image_dir = os.path.join(root, "sbu_captions/images")
    print(f"  fetched {download_url_list([(r['url'], os.path.join(image_dir, r['image'])) for r in records])} images")


def _nocaps_images(root: str) -> None:
    pairs = []
    for split, url in NOCAPS_IMAGE_INFO.items():
        info_path = os.path.join(root, "nocaps/download", os.path.basename(url))
        if not os.path.exists(info_path):
            fetch_url(url, info_path)
        with open(info_path, encoding="utf-8") as f:
            images = json.load(f)["images"]
        pairs += [(im["coco_url"], os.path.join(root, "nocaps/images", split, im["file_name"])) for im in images]
    print(f"  fetched {download_url_list(pairs)} images")


def _msrvtt_move(root: str) -> None:
    src = os.path.join(root, "msrvtt/download/MSRVTT/videos/all")
    dst = os.path.join(root, "msrvtt/videos")
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        os.replace(os.path.join(src, name), os.path.join(dst, name))


def _cc_step(name: str, tsv_path: str | None) -> tuple[str, Callable[[str], None]]:
    caption_first = name == "cc3m"
    sub = "images" if name == "cc3m" else "images_12m"

    def run(root: str) -> None:
        tsv = tsv_path or os.path.join(root, "conceptual_caption/download", "cc12m.tsv")
        if not os.path.isfile(tsv):
            raise FileNotFoundError(f"{name}: TSV not found: {tsv}" + (f" (get it from {CC3M_PAGE}, pass --tsv)" if name == "cc3m" else ""))
        pairs = tsv_to_annotations(tsv, os.path.join(root, f"conceptual_caption/annotations/{name}.json"),
                                   os.path.join(root, "conceptual_caption", sub), caption_first)
        print(f"  fetched {download_url_list(pairs)} of {len(pairs)} images")

    return f"convert the TSV to conceptual_caption/annotations/{name}.json and fetch images into conceptual_caption/{sub}", run


def make_plan(name: str, annotations_only: bool = False, tsv: str | None = None) -> Plan:
    """What ``name`` downloads, where (relative to the root), and what is done afterwards."""
    plan = Plan(name)
    images = not annotations_only
    if name == "coco":
        plan.fetches = annotation_fetches("coco_caption.yaml", "coco_retrieval.yaml") + (_coco_images() if images else [])
    elif name == "vqav2":
        plan.fetches = annotation_fetches("coco_vqa.yaml", "coco_vqa_eval.yaml") + (_coco_images() if images else [])
    elif name == "okvqa":
        plan.fetches = annotation_fetches("ok_vqa.yaml") + (_coco_images() if images else [])
    elif name == "flickr30k":
        plan.fetches = annotation_fetches("flickr30k.yaml")
        plan.notes.append(f"Flickr30k images need the terms accepted at {FLICKR_PAGE}; "
                          "unpack flickr30k-images/ into <root>/flickr30k/images/")
    elif name == "nocaps":
        plan.fetches = annotation_fetches("nocaps.yaml")
        if images:
            plan.steps.append(("fetch NoCaps images (Open Images URLs) into nocaps/images/{val,test}", _nocaps_images))
    elif name == "gqa":
        plan.fetches = annotation_fetches("gqa.yaml", "gqa_balanced_val.yaml", "gqa_balanced_testdev.yaml")
        if images:
            plan.fetches.append(Fetch(GQA_IMAGES, "gqa/download/images.zip", "gqa"))
    elif name == "vg":
        plan.fetches = annotation_fetches("vg_caption.yaml")
        if images:
            plan.fetches += [Fetch(u, f"vg/download/{os.path.basename(u)}", "vg/images") for u in VG_ZIPS]
    elif name == "sbu":
        plan.fetches = annotation_fetches("sbu_caption.yaml")
        if images:
            plan.steps.append(("fetch SBU images from the URLs in sbu.json into sbu_captions/images", _sbu_images))
    elif name == "cc3m":
        plan.notes.append(f"CC3M: download Train_GCC-training.tsv from {CC3M_PAGE} and pass it with --tsv")
        plan.steps.append(_cc_step("cc3m", tsv))
    elif name == "cc12m":
        if tsv is None:
            plan.fetches.append(Fetch(CC12M_TSV, "conceptual_caption/download/cc12m.tsv"))
        plan.steps.append(_cc_step("cc12m", tsv))
    elif name == "msrvtt":
        plan.fetches = annotation_fetches("msrvtt_caption.yaml", "msrvtt_qa.yaml")
        if images:
            plan.fetches.append(Fetch(MSRVTT_ZIP, "msrvtt/download/MSRVTT.zip", "msrvtt/download"))
            plan.steps.append(("move MSRVTT/videos/all/*.mp4 into msrvtt/videos", _msrvtt_move))
    elif name == "laion":
        plan.notes.append("LAION: build webdataset shards with img2dataset, e.g. `img2dataset --url_list laion.parquet "
                          "--input_format parquet --url_col URL --caption_col TEXT --output_format webdataset "
                          "--output_folder <root>/laion/shards --image_size 384`, then set the laion builder's "
                          "build_info.storage to laion/shards/{00000..NNNNN}.tar")
    else:
        raise SystemExit(f"unknown dataset {name!r}; choose from: {', '.join(DATASETS)}")
    return plan


DATASETS = ("coco", "flickr30k", "nocaps", "vqav2", "okvqa", "gqa", "vg", "sbu", "cc3m", "cc12m", "msrvtt", "laion")


def run_plan(plan: Plan, root: str, dry_run: bool = False) -> list[str]:
    """Execute (or, with ``dry_run``, only describe) a plan; returns the printed lines."""
    lines = [f"# {plan.name} -> {root}"]
    print(lines[0])
    for fetch in plan.fetches:
        dest = os.path.join(root, fetch.dest)
        done = os.path.exists(dest)
        lines.append(f"GET {fetch.url} -> {dest}" + (" (exists, kept)" if done else "")
                     + (f" ; extract to {os.path.join(root, fetch.extract_to)}" if fetch.extract_to else ""))
        print(lines[-1])
        if dry_run:
            continue
        if not done:
            fetch_url(fetch.url, dest)
        if fetch.extract_to:
            marker = dest + ".extracted"
            if not os.path.exists(marker):
                extract(dest, os.path.join(root, fetch.extract_to))
                open(marker, "w").close()
    for description, step in plan.steps:
        lines.append(f"STEP {description}")
        print(lines[-1])
        if not dry_run:
            step(root)
    for note in plan.notes:
        lines.append(f"NOTE {note}")
        print(lines[-1])
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datasets.download", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=DATASETS)
    parser.add_argument("--root", default=str(cache_root()),
                        help="cache root (the builders' cache_root)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be fetched and where")
    parser.add_argument("--annotations-only", action="store_true", help="skip images/videos")
    parser.add_argument("--tsv", default=None, help="CC3M/CC12M TSV file (CC3M needs a manual download)")
    args = parser.parse_args(argv)
    root = os.path.abspath(os.path.expanduser(args.root))
    run_plan(make_plan(args.name, args.annotations_only, args.tsv), root, dry_run=args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
