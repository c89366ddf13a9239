"""Caption scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr, optional SPICE) with pycocoevalcap.

The scorers are the standard COCO caption ones; this module only prepares their inputs (PTB
tokenisation of references and predictions keyed by image id), builds COCO-format ground truth
files for any caption dataset, and skips SPICE with one warning when its Stanford CoreNLP jars
(downloaded by pycocoevalcap on first use, impossible offline) are not installed.

pycocoevalcap is imported lazily: importing this module costs nothing.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Mapping, Sequence

logger = logging.getLogger(__name__)

ALL_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
_SPICE_WARNED = False


def _import_pycocoevalcap():
    try:
        # pycocoevalcap: loaded when scoring; `import tasks` loads no metric library
        import pycocoevalcap  # noqa: F401, PLC0415
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # noqa: PLC0415
    except ImportError as err:
        raise ImportError(
            "Caption metrics need pycocoevalcap (and Java for PTB tokenisation and METEOR): pip install pycocoevalcap"
        ) from err
    return PTBTokenizer


def spice_available() -> bool:
    """True when SPICE can run offline: its jar and the Stanford CoreNLP jars it needs are present."""
    try:
        # pycocoevalcap: loaded when scoring; `import tasks` loads no metric library
        import pycocoevalcap.spice as spice_pkg  # noqa: PLC0415
    except ImportError:
        return False
    spice_dir = Path(list(spice_pkg.__path__)[0])
    needed = [
        spice_dir / "spice-1.0.jar",
        spice_dir / "lib" / "stanford-corenlp-3.6.0.jar",
        spice_dir / "lib" / "stanford-corenlp-3.6.0-models.jar",
    ]
    return all(p.is_file() for p in needed)


def _warn_spice_skipped() -> None:
    global _SPICE_WARNED  # one warning per process, not one per evaluation
    if not _SPICE_WARNED:
        _SPICE_WARNED = True
        warnings.warn(
            "SPICE skipped: its Stanford CoreNLP models are not installed (pycocoevalcap downloads "
            "stanford-corenlp-3.6.0 into pycocoevalcap/spice/lib on first use, which needs the network). "
            "Run `python -m pycocoevalcap.spice.get_stanford_models` once online to enable it.",
            stacklevel=3,
        )


def caption_scores(
    predictions: Mapping[object, str],
    references: Mapping[object, Sequence[str]],
    metrics: Sequence[str] | None = None,
) -> dict[str, float]:
    """Corpus-level caption scores of ``predictions`` (image_id -> caption) against ``references``
    (image_id -> list of reference captions), on the images that have a prediction.

    ``metrics`` selects a subset of ALL_METRICS (default: all; SPICE silently dropped with one
    warning when unavailable). Scores are the raw pycocoevalcap values (BLEU in [0, 1], CIDEr ~[0, 10]).
    """
    wanted = list(ALL_METRICS if metrics is None else metrics)
    unknown = [m for m in wanted if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"caption_scores: unknown metrics {unknown}; choose from {list(ALL_METRICS)}")
    missing = [i for i in predictions if i not in references]
    if missing:
        raise KeyError(
            f"caption_scores: {len(missing)} predicted image ids have no reference captions, e.g. {missing[:5]}"
        )
    if not predictions:
        raise ValueError("caption_scores: no predictions to score")
    if "SPICE" in wanted and not spice_available():
        _warn_spice_skipped()
        wanted.remove("SPICE")

    PTBTokenizer = _import_pycocoevalcap()
    ids = list(predictions)
    gts = {i: [{"caption": str(c)} for c in references[i]] for i in ids}
    res = {i: [{"caption": str(predictions[i])}] for i in ids}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print progress
        tokenizer = PTBTokenizer()
        gts_tok, res_tok = tokenizer.tokenize(gts), tokenizer.tokenize(res)
        return _run_scorers(gts_tok, res_tok, wanted)


def _run_scorers(gts: dict, res: dict, wanted: list[str]) -> dict[str, float]:
    # pycocoevalcap: loaded when scoring; `import tasks` loads no metric library
    from pycocoevalcap.bleu.bleu import Bleu  # noqa: PLC0415
    from pycocoevalcap.cider.cider import Cider  # noqa: PLC0415
    from pycocoevalcap.meteor.meteor import Meteor  # noqa: PLC0415
    from pycocoevalcap.rouge.rouge import Rouge  # noqa: PLC0415

    out: dict[str, float] = {}
    if any(m.startswith("Bleu_") for m in wanted):
        bleu, _ = Bleu(4).compute_score(gts, res)
        out.update({f"Bleu_{n + 1}": float(bleu[n]) for n in range(4) if f"Bleu_{n + 1}" in wanted})
    if "METEOR" in wanted:
        meteor = Meteor()
        try:
            out["METEOR"] = float(meteor.compute_score(gts, res)[0])
        finally:
            _close_meteor(meteor)
    if "ROUGE_L" in wanted:
        out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in wanted:
        out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if "SPICE" in wanted:
        # pycocoevalcap: loaded when scoring; `import tasks` loads no metric library
        from pycocoevalcap.spice.spice import Spice  # noqa: PLC0415

        out["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return out


def _close_meteor(meteor) -> None:
    """Stop the METEOR JVM now instead of at garbage collection."""
    proc = getattr(meteor, "meteor_p", None)
    if proc is None:
        return
    with contextlib.suppress(Exception):
        with meteor.lock:
            proc.stdin.close()
            proc.kill()
            proc.wait()


def write_coco_caption_gt(references: Mapping[object, Sequence[str]], path: str | os.PathLike) -> str:
    """Write reference captions as a COCO caption annotation file (``images``/``annotations``).

    Readable by ``pycocotools.coco.COCO`` and by ``load_coco_caption_gt``. Returns the path.
    """
    images, annotations = [], []
    for image_id, captions in references.items():
        images.append({"id": image_id})
        for caption in captions:
            annotations.append({"image_id": image_id, "id": len(annotations), "caption": str(caption)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"info": {}, "licenses": [], "type": "captions", "images": images, "annotations": annotations}, f)
    os.replace(tmp, path)
    return str(path)


def load_coco_caption_gt(path: str | os.PathLike) -> dict[object, list[str]]:
    """Read a COCO caption annotation file into image_id -> list of captions."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{path}: not a COCO caption file (expected a dict with an 'annotations' list)")
    out: dict[object, list[str]] = {}
    for i, ann in enumerate(data["annotations"]):
        if "image_id" not in ann or "caption" not in ann:
            raise ValueError(f"{path}: annotation {i} lacks 'image_id' or 'caption': {ann}")
        out.setdefault(ann["image_id"], []).append(ann["caption"])
    return out
