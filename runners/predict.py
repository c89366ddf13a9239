"""Point a BLIP-2 model at your images: captions, answers, ITM/ITC scores, features, text-to-image search.

    blip2-predict caption  -m blip2_opt:tiny photos/ -o captions.jsonl
    blip2-predict vqa      -m blip2_opt:tiny photos/ -q "what is in the picture?" -o answers.jsonl
    blip2-predict vqa      -m output/my_job --questions questions.jsonl -o answers.jsonl  # {"image", "question"}
    blip2-predict itm      -m blip2:tiny "photos/*.jpg" -t "a dog" -t "a cat" -o scores.jsonl
    blip2-predict features -m blip2:tiny photos/ -o features.jsonl
    blip2-predict search   -m blip2:tiny photos/ -t "a red circle" --top-k 5

(``python -m runners.predict`` is the same program.) ``-m`` takes a zoo model ``ARCH:TYPE``, a training job
directory, one of its checkpoint directories, or a Hugging Face BLIP-2 directory. Inputs are files, folders (searched
recursively) or globs. Output is JSONL, one record per image (per question for ``vqa``, per query for ``search``),
written batch by batch; run the same command again after an interruption and it continues where it stopped
(``--overwrite`` starts over). Without ``-o`` records go to stdout.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from runners.inference import PRECISION_CHOICES, PRECISION_HELP, load_spec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TASKS = ("caption", "vqa", "itm", "itc", "features", "search")


# -- inputs -------------------------------------------------------------------------------------------------------
def collect_images(inputs: Sequence[str]) -> list[str]:
    """Image paths from files, folders (recursive, sorted) and globs; an input matching nothing is an error."""
    found: list[str] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            matches = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            matches = [str(path)]
        else:
            matches = sorted(p for p in glob.glob(os.path.expanduser(item), recursive=True)
                             if Path(p).suffix.lower() in IMAGE_SUFFIXES and os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"input {item!r}: no such file, no image ({', '.join(IMAGE_SUFFIXES)}) in that "
                                    f"folder, or a glob that matches no image")
        found += matches
    return list(dict.fromkeys(found))  # in order, without repeats


def read_questions(path: str) -> list[tuple[str, str]]:
    """(image, question) rows of a JSONL file with ``image`` and ``question`` keys (image relative to the file)."""
    rows = []
    base = Path(path).parent
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not a JSON object ({err})") from err
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not isinstance(
                    rec.get("question"), str) or not rec["question"].strip():
                raise ValueError(f"{path}:{n}: expected {{\"image\": path, \"question\": non-empty text}}, got {line.strip()[:120]}")
            image = Path(rec["image"]).expanduser()
            image = image if image.is_absolute() or image.exists() else base / image
            if not image.is_file():
                raise FileNotFoundError(f"{path}:{n}: image {rec['image']!r} not found (also looked in {base})")
            rows.append((str(image), rec["question"]))
    if not rows:
        raise ValueError(f"{path}: no questions")
    return rows


def read_texts(texts: Sequence[str] | None, texts_file: str | None, what: str) -> list[str]:
    out = [t for t in (texts or [])]
    if texts_file:
        with open(texts_file, encoding="utf-8") as fh:
            out += [line.rstrip("\n") for line in fh if line.strip()]
    out = [t.strip() for t in out]
    if not out or any(not t for t in out):
        raise ValueError(f"{what}: give at least one non-empty text with -t/--text or --texts FILE")
    return out


# -- resumable JSONL output ---------------------------------------------------------------------------------------
class JsonlSink:
    """Append records to a JSONL file (or stdout), flushed after every batch. On open, an existing file's complete
    records are kept (their keys are ``done``) and a torn last line, left by a kill mid-write, is cut off."""

    def __init__(self, path: str | None, key: Callable[[dict], Any], overwrite: bool = False) -> None:
        self.key = key
        self.done: set = set()
        if path is None:
            self.fh = sys.stdout
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and not overwrite:
            self.done = self._recover(target)
        self.fh = open(target, "w" if overwrite else "a", encoding="utf-8")

    def _recover(self, target: Path) -> set:
        data = target.read_bytes()
        keep = data[: data.rfind(b"\n") + 1]  # complete lines only
        if len(keep) != len(data):
            with open(target, "r+b") as fh:
                fh.truncate(len(keep))
        done = set()
        for n, line in enumerate(keep.decode("utf-8").splitlines(), 1):
            if line.strip():
                try:
                    done.add(self.key(json.loads(line)))
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{target}:{n} is not a record of this command ({err}); "
                                     "use another -o file or --overwrite") from err
        return done

    def write(self, records: Iterable[dict]) -> None:
        for rec in records:
            self.fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.fh.flush()

    def close(self) -> None:
        if self.fh is not sys.stdout:
            self.fh.close()


def batches(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr)


def _load_batch(paths: Sequence[str]) -> tuple[list[Any], list[str], dict[str, str]]:
    """(PIL images, their paths, {path: error}) of the readable files of a batch."""
    # processors (torchvision: seconds) load with the first batch
    from processors.image import ImageLoadError, load_image

    images, ok, errors = [], [], {}
    for path in paths:
        try:
            images.append(load_image(path))
            ok.append(path)
        except ImageLoadError as err:
            errors[path] = str(err)
    return images, ok, errors


# -- tasks --------------------------------------------------------------------------------------------------------
def decoding_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(use_nucleus_sampling=args.sample, num_beams=args.num_beams, max_length=args.max_length,
                min_length=args.min_length, top_p=args.top_p, temperature=args.temperature,
                repetition_penalty=args.repetition_penalty, length_penalty=args.length_penalty,
                num_captions=args.num_captions)


def run_images(args, predictor, sink: JsonlSink, paths: list[str], compute: Callable[[list, list[str]], list[dict]]):
    """Shared loop over image batches: skip done paths, record unreadable files, write each batch."""
    todo = [p for p in paths if p not in sink.done]
    with _progress(len(paths), args.task, not args.quiet) as bar:
        bar.update(len(paths) - len(todo))
        for chunk in batches(todo, args.batch_size):
            images, ok, errors = _load_batch(chunk)
            results = dict(zip(ok, compute(images, ok))) if images else {}
            sink.write([results[p] if p in results else {"image": p, "error": errors[p]} for p in chunk])
            bar.update(len(chunk))


def task_caption(args, predictor, sink):
    predictor.require("caption")
    decoding = decoding_kwargs(args)

    def compute(images, paths):
        captions = predictor.caption(images, prompt=args.prompt, **decoding)
        return [{"image": p, "caption": c[0], **({"captions": c} if len(c) > 1 else {})}
                for p, c in zip(paths, captions)]

    run_images(args, predictor, sink, collect_images(args.inputs), compute)


def task_vqa(args, predictor, sink):
    predictor.require("vqa")
    if args.questions:
        if args.inputs or args.question:
            raise ValueError("vqa: give either --questions FILE, or images with -q/--question, not both")
        rows = read_questions(args.questions)
    else:
        questions = [q.strip() for q in args.question or []]
        if not questions or not all(questions):
            raise ValueError("vqa: give a non-empty -q/--question (repeatable) or --questions FILE (JSONL)")
        if not args.inputs:
            raise ValueError("vqa: name the images (files, folders or globs) to ask about")
        rows = [(img, q) for img in collect_images(args.inputs) for q in questions]
    answer_list = None
    if args.answer_list:
        answer_list = read_texts(None, args.answer_list, "--answer-list")
    decoding = dict(num_beams=args.num_beams, max_len=args.max_length, min_len=args.min_length,
                    length_penalty=args.length_penalty, inference_method="rank" if answer_list else "generate",
                    **({"answer_list": answer_list} if answer_list else {}))
    todo = [r for r in rows if r not in sink.done]
    with _progress(len(rows), "vqa", not args.quiet) as bar:
        bar.update(len(rows) - len(todo))
        for chunk in batches(todo, args.batch_size):
            images, ok, errors = _load_batch(sorted({img for img, _ in chunk}))
            by_path = dict(zip(ok, images))
            good = [(img, q) for img, q in chunk if img in by_path]
            answers = predictor.answer([by_path[i] for i, _ in good], [q for _, q in good], prompt=args.prompt or "",
                                       **decoding) if good else []
            found = {row: a for row, a in zip(good, answers)}
            sink.write([{"image": img, "question": q, **({"answer": found[(img, q)]} if (img, q) in found
                                                            else {"error": errors[img]})} for img, q in chunk])
            bar.update(len(chunk))


def task_scores(args, predictor, sink):
    predictor.require("match")
    texts = read_texts(args.text, args.texts, args.task)
    heads = ("itm",) if args.task == "itm" else ("itc",)

    def compute(images, paths):
        scores = predictor.scores(images, texts, heads)
        return [{"image": p, **{head: {t: round(float(v), 6) for t, v in zip(texts, s[i])}
                                for head, s in scores.items()}} for i, p in enumerate(paths)]

    run_images(args, predictor, sink, collect_images(args.inputs), compute)


def task_features(args, predictor, sink):
    predictor.require("match")

    def compute(images, paths):
        feats, _ = predictor.image_features(images)  # [B, Q, E]
        if args.pool == "mean":
            feats = feats.mean(dim=1)
        return [{"image": p, "shape": list(f.shape), "features": [round(x, 6) for x in f.flatten().tolist()]}
                for p, f in zip(paths, feats)]

    run_images(args, predictor, sink, collect_images(args.inputs), compute)


def task_search(args, predictor, sink):
    """Text -> images: ITC similarity over the folder, the top ``--rerank`` re-scored by ITM (as LAVIS retrieval)."""
    predictor.require("match")
    queries = [q for q in read_texts(args.text, args.texts, "search") if q not in sink.done]
    paths = collect_images(args.inputs)
    if not queries:
        return
    feats, embeds, kept = [], [], []
    with _progress(len(paths), "index", not args.quiet) as bar:
        for chunk in batches(paths, args.batch_size):
            images, ok, _ = _load_batch(chunk)
            if images:
                f, e = predictor.image_features(images)
                feats.append(f)
                embeds.append(e)
                kept += ok
            bar.update(len(chunk))
    if not kept:
        raise ValueError("search: none of the images could be read")
    feats, embeds = torch.cat(feats), torch.cat(embeds)
    text_feat, ids, atts = predictor.text_features(queries)
    itc = predictor.itc_similarity(feats, text_feat)  # [N, Q_text]
    k = min(args.top_k, len(kept))
    for j, query in enumerate(queries):
        top = itc[:, j].topk(min(max(k, args.rerank), len(kept))).indices
        hits = [{"image": kept[i], "itc": round(float(itc[i, j]), 6)} for i in top.tolist()]
        if args.rerank:
            itm = predictor.itm_probability(embeds[top], ids[j : j + 1], atts[j : j + 1])[:, 0]
            for hit, score in zip(hits, itm.tolist()):
                hit["itm"] = round(score, 6)
            hits.sort(key=lambda h: -h["itm"])
        sink.write([{"query": query, "results": hits[:k]}])


RUNNERS = {"caption": task_caption, "vqa": task_vqa, "itm": task_scores, "itc": task_scores,
           "features": task_features, "search": task_search}
RECORD_KEYS = {"vqa": lambda r: (r["image"], r["question"]), "search": lambda r: r["query"]}


# -- command line -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model and run")
    g.add_argument("-m", "--model", default="blip2_opt:tiny",
                   help="ARCH:TYPE from the zoo, a training job dir, a checkpoint dir or a HF BLIP-2 dir "
                        "(default: %(default)s)")
    g.add_argument("--checkpoint", help="weights (any supported format) loaded on top of the model")
    g.add_argument("--options", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model config overrides, e.g. llm_kwargs.quantization=int8 image_size=364")
    g.add_argument("-o", "--output", help="JSONL file (resumed if it exists); default: stdout")
    g.add_argument("--overwrite", action="store_true", help="start the output file over instead of resuming")
    g.add_argument("-b", "--batch-size", type=int, default=8)
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    g.add_argument("--precision", default="fp32", choices=PRECISION_CHOICES, help=PRECISION_HELP)
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    d = common.add_argument_group("decoding (caption, vqa)")
    d.add_argument("--num-beams", type=int, default=5)
    d.add_argument("--max-length", type=int, default=30, help="new tokens at most (vqa default 10)")
    d.add_argument("--min-length", type=int, default=1)
    d.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    d.add_argument("--top-p", type=float, default=0.9)
    d.add_argument("--temperature", type=float, default=1.0)
    d.add_argument("--repetition-penalty", type=float, default=1.0)
    d.add_argument("--length-penalty", type=float, default=1.0)
    d.add_argument("--num-captions", type=int, default=1)
    d.add_argument("--prompt", default=None, help="caption: text the caption continues; vqa: template with {}")
    d.add_argument("--seed", type=int, default=0, help="random seed (sampling)")

    parser = argparse.ArgumentParser(prog="blip2-predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True, metavar="{" + ",".join(TASKS) + "}")
    helps = {"caption": "caption images", "vqa": "answer questions about images",
             "itm": "image-text match probability (ITM head) for each image x text",
             "itc": "image-text cosine similarity (ITC) for each image x text",
             "features": "Q-Former image features (normalised ITC projections)",
             "search": "rank the images for each text query"}
    for task in TASKS:
        p = sub.add_parser(task, parents=[common], help=helps[task], description=helps[task])
        p.add_argument("inputs", nargs="*", help="image files, folders or globs")
        if task == "vqa":
            p.add_argument("-q", "--question", action="append", help="question (repeatable)")
            p.add_argument("--questions", help='JSONL of {"image": path, "question": text}')
            p.add_argument("--answer-list", help="file of candidate answers, one a line: rank them instead of generating")
        if task in ("itm", "itc", "search"):
            p.add_argument("-t", "--text", action="append", help="text (repeatable)")
            p.add_argument("--texts", help="file of texts, one a line")
        if task == "features":
            p.add_argument("--pool", choices=("none", "mean"), default="none",
                           help="none: every query's feature [Q, E]; mean: their mean [E]")
        if task == "search":
            p.add_argument("--top-k", type=int, default=5)
            p.add_argument("--rerank", type=int, default=16, help="re-score the top N by ITM (0: ITC only)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.task == "vqa" and "--max-length" not in (argv if argv is not None else sys.argv):
        args.max_length = 10
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.task in ("caption", "itm", "itc", "features", "search") and not args.inputs:
        parser.error(f"{args.task}: name the images (files, folders or globs)")

    try:
        overrides = OmegaConf.to_container(OmegaConf.from_dotlist(list(args.options))) if args.options else {}
        if args.task in ("caption", "itm", "itc", "features", "search"):
            collect_images(args.inputs)  # bad paths fail before the model is built
        torch.manual_seed(args.seed)
        predictor = load_spec(args.model, device=args.device, precision=args.precision,
                              checkpoint=args.checkpoint, overrides=overrides)
        sink = JsonlSink(args.output, RECORD_KEYS.get(args.task, lambda r: r["image"]), args.overwrite)
        try:
            RUNNERS[args.task](args, predictor, sink)
        finally:
            sink.close()
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"blip2-predict {args.task}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
