"""Metric tests with hand-computed expectations: VQA accuracy + normalisation, GQA, recall@k, captions."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from tasks.metrics import caption as caption_metrics
from tasks.metrics.retrieval import recall_at_k, retrieval_metrics
from tasks.metrics.vqa import (
    AnswerLemmatizer,
    gqa_accuracy,
    gqa_exact_match,
    normalize_answer,
    normalize_punctuation,
    vqa_accuracy,
    vqa_scores,
)


# -- VQA normalisation: one case per rule ---------------------------------------------------------
@pytest.mark.parametrize(
    "raw, expected",
    [
        ("black/white", "black white"),  # punctuation not touching a space -> space
        ("black / white", "black white"),  # touching a space -> deleted (then whitespace collapsed)
        ("yes!", "yes"),  # trailing punctuation
        ("1,000", "1000"),  # digit,digit anywhere -> every punctuation mark deleted
        ("red, white", "red white"),  # comma followed by a space -> deleted
        ("3.5", "3.5"),  # a decimal point is kept
        ("dog.", "dog"),  # a period not followed by a digit is deleted
        ("Two", "2"),  # number words -> digits (after lowercasing)
        ("none", "0"),
        ("ten apples", "10 apples"),
        ("a dog", "dog"),  # articles dropped
        ("the Red Car", "red car"),
        ("an apple", "apple"),
        ("dont", "don't"),  # contractions restored
        ("isnt", "isn't"),
        ("couldnt've", "couldn't've"),
        ("whats that", "what's that"),
        ("shouldve", "should've"),
        ("its", "its"),  # ordinary words are not contractions
        ("well", "well"),
        ("  tab\tand\nnewline ", "tab and newline"),
    ],
)
def test_normalize_answer_rules(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_normalize_punctuation_keeps_apostrophes_and_case() -> None:
    assert normalize_punctuation("Don't (maybe)") == "Don't maybe "  # '(' touches a space: deleted; ')' does not: space


# -- VQA accuracy: min(#matches/3, 1) averaged over the 10 leave-one-out subsets ------------------
@pytest.mark.parametrize(
    "n_match, expected",
    [
        (0, 0.0),
        (1, (1 * 0.0 + 9 * (1 / 3)) / 10),  # 0.3
        (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
        (3, (3 * (2 / 3) + 7 * 1.0) / 10),  # 0.9
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_leave_one_out(n_match: int, expected: float) -> None:
    refs = ["2"] * n_match + ["3"] * (10 - n_match)
    if n_match == 10:
        refs = ["2"] * 10
    assert vqa_accuracy("two", refs) == pytest.approx(expected)


def test_vqa_accuracy_normalises_prediction_and_disagreeing_references() -> None:
    refs = ["yes."] * 3 + ["no"] * 7  # humans disagree -> references get the punctuation step
    assert vqa_accuracy("Yes.", refs) == pytest.approx(0.9)
    # Official behaviour: unanimous references are compared as written.
    assert vqa_accuracy("2", ["Two"] * 10) == 0.0
    assert vqa_accuracy("2", ["Two"] * 10, normalize_references=True) == 1.0
    # One reference: exact match after normalisation.
    assert vqa_accuracy("the cat", ["cat"]) == 1.0
    assert vqa_accuracy("dog", ["cat"]) == 0.0
    with pytest.raises(ValueError, match="no reference answers"):
        vqa_accuracy("x", [])


def official_vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """The official VQA evaluation (LAVIS ``vqa_eval.py``, ``VQAEval.evaluate``) written out for one question."""
    res = normalize_answer(prediction)  # processPunctuation + processDigitArticle of the prediction
    gts = [{"answer": a, "answer_id": i} for i, a in enumerate(human_answers)]
    if len({g["answer"] for g in gts}) > 1:
        for g in gts:
            g["answer"] = normalize_punctuation(g["answer"])  # punctuation only, nothing else
    accs = []
    for g in gts:
        others = [o for o in gts if o != g]
        accs.append(min(1.0, len([o for o in others if o["answer"] == res]) / 3))
    return sum(accs) / len(accs)


@pytest.mark.parametrize("prediction, humans, expected", [
    ("2", ["two"] * 8 + ["2"] * 2, 0.6),  # number words in human answers are not mapped to digits
    ("dog", ["the dog"] * 5 + ["dog"] * 5, 1.0),  # articles stay in human answers: 5 exact matches
    ("cat", ["a cat"] * 9 + ["cat"], 0.3),
    ("dont know", ["dont know"] * 6 + ["no"] * 4, 0.0),  # the prediction becomes "don't know"; humans do not
    ("yes", ["yes."] * 2 + ["no"] * 8, 0.6),  # punctuation is stripped from disagreeing human answers
    ("yes", ["yes!"] * 2 + ["no"] * 8, 0.0),  # ... as the official script does: "yes!" -> "yes " (a space)
])
def test_vqa_accuracy_human_answers_get_punctuation_only(prediction, humans, expected) -> None:
    assert vqa_accuracy(prediction, humans) == pytest.approx(expected, abs=1e-12)
    assert official_vqa_accuracy(prediction, humans) == pytest.approx(expected, abs=1e-12)


def test_vqa_scores_overall_and_per_answer_type() -> None:
    gt = {
        1: {"answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is the"},
        2: {"answers": ["2"] * 2 + ["3"] * 8, "answer_type": "number", "question_type": "how many"},
        3: {"answers": ["red"] * 10, "answer_type": "other", "question_type": "what color"},
        4: {"answers": ["no"] * 10, "answer_type": "yes/no", "question_type": "is the"},
    }
    preds = {1: "yes", 2: "two", 3: "blue", 4: "no"}
    scores = vqa_scores(preds, gt)
    assert scores["overall"] == pytest.approx(100 * (1 + 0.6 + 0 + 1) / 4)
    assert scores["per_answer_type"] == pytest.approx({"number": 60.0, "other": 0.0, "yes/no": 100.0})
    assert scores["per_question_type"]["is the"] == pytest.approx(100.0)
    assert scores["num_questions"] == 4
    with pytest.raises(KeyError, match="no ground truth"):
        vqa_scores({99: "x"}, gt)


# -- GQA -------------------------------------------------------------------------------------------
def test_gqa_exact_match() -> None:
    assert gqa_exact_match("The Table.", "table")
    assert gqa_exact_match("two", "2")
    assert not gqa_exact_match("tables", "table")
    preds = {"a": "left", "b": "a red car", "c": "no"}
    refs = {"a": "left", "b": "red car", "c": "yes"}
    assert gqa_accuracy(preds, refs) == pytest.approx(200 / 3)
    with pytest.raises(KeyError):
        gqa_accuracy({"z": "x"}, refs)


# -- lemmatisation ----------------------------------------------------------------------------------
class _Token:
    def __init__(self, text: str, lemma: str, pos: str) -> None:
        self.text, self.lemma_, self.pos_ = text, lemma, pos


def test_lemmatizer_with_injected_pipeline() -> None:
    table = {"dogs": ("dog", "NOUN"), "running": ("run", "VERB"), "red": ("red", "ADJ")}

    def nlp(text: str) -> list[_Token]:
        return [_Token(w, *table.get(w, (w, "X"))) for w in text.split()]

    assert AnswerLemmatizer(nlp=nlp)(["dogs running", "red dogs"]) == ["dog run", "red dog"]


def test_lemmatizer_without_spacy_raises_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "spacy", None)  # import spacy -> ImportError
    with pytest.raises(ImportError, match="pip install spacy"):
        AnswerLemmatizer()(["dogs"])


# -- recall@k -----------------------------------------------------------------------------------------
def test_recall_at_k_hand_made_matrix() -> None:
    # 3 queries x 4 candidates; correct items: q0 -> {0}, q1 -> {2, 3}, q2 -> {1}
    scores = np.array(
        [
            [0.9, 0.1, 0.2, 0.3],  # q0: rank 0
            [0.5, 0.8, 0.1, 0.7],  # q1: best positive 3 at 0.7, one better (0.8) -> rank 1
            [0.4, 0.1, 0.3, 0.2],  # q2: positive last -> rank 3
        ]
    )
    r = recall_at_k(scores, [[0], [2, 3], [1]], ks=(1, 2, 3, 4))
    assert r == pytest.approx({1: 100 / 3, 2: 200 / 3, 3: 200 / 3, 4: 100.0})


def test_recall_at_k_ties_count_against_the_model() -> None:
    # A positive tied with two negatives is ranked after both.
    scores = np.array([[0.5, 0.5, 0.5, 0.1], [1.0, 1.0, 1.0, 1.0]])
    r = recall_at_k(scores, [[1], [0, 1]], ks=(1, 2, 3))
    # q0: rank 2 (two tied negatives); q1: best positive tied with negatives 2, 3 -> rank 2
    assert r == pytest.approx({1: 0.0, 2: 0.0, 3: 100.0})
    # A constant matrix is chance level, not perfect.
    const = recall_at_k(np.zeros((4, 4)), [[i] for i in range(4)], ks=(1, 4))
    assert const == pytest.approx({1: 0.0, 4: 100.0})


def test_retrieval_metrics_both_directions() -> None:
    # 2 images, 4 texts; image 0 <-> texts 0, 1; image 1 <-> texts 2, 3
    i2t = np.array([[0.9, 0.1, 0.2, 0.3], [0.8, 0.1, 0.2, 0.3]])  # image 1's best positive has rank 1
    t2i = np.array([[0.9, 0.1], [0.2, 0.3], [0.1, 0.5], [0.6, 0.5]])  # text 1 and 3 wrong at top-1
    m = retrieval_metrics(i2t, t2i, img2txt=[[0, 1], [2, 3]], txt2img=[0, 0, 1, 1])
    assert m["txt_r1"] == pytest.approx(50.0)
    assert m["txt_r5"] == pytest.approx(100.0) and m["txt_r10"] == pytest.approx(100.0)
    assert m["img_r1"] == pytest.approx(50.0)
    assert m["img_r5"] == pytest.approx(100.0)
    assert m["txt_r_mean"] == pytest.approx(250 / 3)
    assert m["img_r_mean"] == pytest.approx(250 / 3)
    assert m["r_mean"] == pytest.approx(250 / 3)
    assert m["agg_metrics"] == pytest.approx(m["txt_r_mean"])
    with pytest.raises(ValueError, match="do not match"):
        recall_at_k(i2t, [[0]])


# -- caption metrics ------------------------------------------------------------------------------------
REFS = {
    1: ["a man riding a horse on a beach", "a person rides a brown horse", "man on horse near the sea"],
    2: ["two dogs playing in the snow", "a pair of dogs run through snow", "dogs play outside in winter"],
    3: ["a red car parked on the street", "a small red car by the road", "red vehicle parked near a curb"],
}
PREDS = {1: "a man riding a horse", 2: "two dogs run in the snow", 3: "a blue car on the road"}


def _direct_pycocoevalcap(preds, refs) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in refs[i]] for i in preds})
    res = tok.tokenize({i: [{"caption": preds[i]}] for i in preds})
    bleu, _ = Bleu(4).compute_score(gts, res)
    out = {f"Bleu_{n + 1}": bleu[n] for n in range(4)}
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return out


def test_caption_scores_match_pycocoevalcap_without_meteor() -> None:
    wanted = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    ours = caption_metrics.caption_scores(PREDS, REFS, metrics=wanted)
    direct = _direct_pycocoevalcap(PREDS, REFS)
    assert set(ours) == set(wanted)
    for k in wanted:
        assert ours[k] == pytest.approx(direct[k], abs=1e-12), k
    assert 0 < ours["Bleu_4"] < ours["Bleu_1"] <= 1
    # A perfect caption set scores higher on every metric.
    perfect = caption_metrics.caption_scores({i: REFS[i][0] for i in REFS}, REFS, metrics=wanted)
    assert all(perfect[k] > ours[k] for k in wanted)


@pytest.mark.slow  # one METEOR JVM (~8 s idle, much more on a loaded machine)
def test_caption_scores_with_meteor_match_pycocoevalcap(monkeypatch: pytest.MonkeyPatch) -> None:
    import pycocoevalcap.meteor.meteor as meteor_module
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # One JVM for both: score directly first, then hand the same scorer to caption_scores.
    meteor = meteor_module.Meteor()
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in REFS[i]] for i in PREDS})
    res = tok.tokenize({i: [{"caption": PREDS[i]}] for i in PREDS})
    direct = meteor.compute_score(gts, res)[0]
    monkeypatch.setattr(meteor_module, "Meteor", lambda: meteor)
    ours = caption_metrics.caption_scores(PREDS, REFS, metrics=["METEOR"])
    assert ours["METEOR"] == pytest.approx(direct, abs=1e-12)
    assert 0 < ours["METEOR"] < 1


def test_importing_tasks_loads_no_metric_library() -> None:
    import subprocess

    code = ("import sys, tasks, tasks.metrics; "
            "bad = [m for m in ('pycocoevalcap', 'pycocotools', 'spacy') if m in sys.modules]; "
            "assert not bad, bad")
    root = str(Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_spice_skipped_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caption_metrics, "spice_available", lambda: False)
    monkeypatch.setattr(caption_metrics, "_SPICE_WARNED", False)
    with pytest.warns(UserWarning, match="SPICE skipped") as record:
        out = caption_metrics.caption_scores(PREDS, REFS, metrics=["SPICE", "Bleu_1"])
    assert len([w for w in record if "SPICE" in str(w.message)]) == 1
    assert set(out) == {"Bleu_1"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time it stays quiet
        caption_metrics.caption_scores(PREDS, REFS, metrics=["SPICE", "Bleu_1"])


def test_spice_availability_reflects_installed_jars() -> None:
    import pycocoevalcap.spice as spice_pkg

    lib = Path(list(spice_pkg.__path__)[0]) / "lib"
    expected = (lib / "stanford-corenlp-3.6.0.jar").is_file() and (lib / "stanford-corenlp-3.6.0-models.jar").is_file()
    assert caption_metrics.spice_available() == expected


def test_caption_scores_input_errors() -> None:
    with pytest.raises(KeyError, match="no reference captions"):
        caption_metrics.caption_scores({42: "x"}, REFS, metrics=["Bleu_1"])
    with pytest.raises(ValueError, match="unknown metrics"):
        caption_metrics.caption_scores(PREDS, REFS, metrics=["BLEU"])


def test_coco_caption_gt_roundtrip_and_pycocotools(tmp_path) -> None:
    path = caption_metrics.write_coco_caption_gt(REFS, tmp_path / "gt" / "val_gt.json")
    assert caption_metrics.load_coco_caption_gt(path) == REFS
    from pycocotools.coco import COCO

    coco = COCO(path)
    assert sorted(coco.getImgIds()) == [1, 2, 3]
    assert [a["caption"] for a in coco.imgToAnns[2]] == REFS[2]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"caption": "x"}]))
    with pytest.raises(ValueError, match="not a COCO caption file"):
        caption_metrics.load_coco_caption_gt(bad)
