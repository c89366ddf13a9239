"""VQA answer normalisation and accuracy (VQAv2 / OK-VQA protocol) and GQA exact match.

The VQAv2 protocol scores a predicted answer against the (usually 10) human answers: for every
leave-one-out subset of the references, ``min(#references equal to the prediction / 3, 1)``,
averaged over the subsets. Before comparing, answers are normalised the way the official
evaluation script does it: predictions get the full normalisation (punctuation removed or turned
into spaces, number words become digits, articles dropped, missing apostrophes in contractions
restored); the human answers only get the punctuation step, and only when they disagree.

Written from the protocol's description (https://visualqa.org/evaluation.html); the behaviour
of the official script is kept where it matters for parity (see ``vqa_accuracy``).
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable, Iterable, Mapping, Sequence

# Characters that the official script removes (or replaces by a space). The apostrophe and the
# period are handled separately (apostrophes are kept for contractions, periods only go when
# they are not a decimal point).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")


def _build_contractions() -> dict[str, str]:
    """Map contractions written without their apostrophes to the apostrophe form ("dont" -> "don't").

    Built from the patterns of the official list (negations, modal + have, pronoun / wh-word + 'd,
    'll, 're, 's, 've) rather than spelled out; forms that are also ordinary words ("well", "were",
    "shed", "wed", "its", "ill", "lets") are deliberately absent, as in the official list.
    """
    table: dict[str, str] = {}
    negatable = "ai are ca could did does do had has have is might must need ought sha should was were wo would"
    for stem in negatable.split():
        table[stem + "nt"] = stem + "n't"
    for stem in "could had might should would".split():  # couldn't've
        table[stem + "nt've"] = table[stem + "n'tve"] = stem + "n't've"
    for stem in "could might must should would not".split():  # could've, not've
        table[stem + "ve"] = stem + "'ve"
    suffixes = {
        "d": "he how it somebody someone something there they where who you",
        "d've": "he it she somebody someone something there they we who you",
        "ll": "how it somebody someone something they what who why you",
        "re": "there they what why you",
        "s": "he she how somebody someone something that there what when where who why",
        "ve": "they we what where who you",
    }
    for suffix, stems in suffixes.items():
        for stem in stems.split():
            table[stem + suffix] = f"{stem}'{suffix}"
            if suffix == "d've":  # both "hed've" and "he'dve" occur
                table[f"{stem}'dve"] = f"{stem}'d've"
    table.update({
        "maam": "ma'am", "oclock": "o'clock", "twas": "'twas", "yall": "y'all",
        "yall'll": "y'all'll", "y'allll": "y'all'll",
        "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    })
    return table


CONTRACTIONS: dict[str, str] = _build_contractions()


def normalize_punctuation(text: str) -> str:
    """Remove punctuation as the official script does.

    A punctuation character is deleted when it touches a space in the input, or when the input
    contains a thousands separator (digit,digit); otherwise it becomes a space ("black/white" ->
    "black white", "1,000" -> "1000"). Periods are deleted unless a digit follows ("3.5" stays).
    """
    out = text
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_DECIMAL.sub("", out)


def normalize_digits_articles(text: str) -> str:
    """Lowercase, number words -> digits, drop articles, restore contractions; single spaces."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The full normalisation applied to predictions: whitespace, punctuation, digits, articles."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return normalize_digits_articles(normalize_punctuation(text))


def vqa_accuracy(prediction: str, references: Sequence[str], normalize_references: bool = False) -> float:
    """VQAv2 accuracy of one prediction against the human answers, in [0, 1].

    As the official evaluation (and LAVIS's copy of it, ``vqa_eval.py``): the prediction is fully
    normalised (``normalize_answer``); the human answers are compared as they are when they all
    agree, and with punctuation stripped only (``normalize_punctuation``, no number words, articles or
    contractions) when they disagree: the official annotation files are already normalised.
    ``normalize_references=True`` applies the full normalisation to them always, for user data whose
    answers were never normalised (this departs from the official numbers; e.g. prediction "2" against
    8 x "two" and 2 x "2" scores 0.6 officially and 1.0 with it).

    With n >= 2 references the score is the mean over the n leave-one-out subsets of
    ``min(matches / 3, 1)``; with a single reference it is plain exact match.
    """
    if len(references) == 0:
        raise ValueError("vqa_accuracy: a question has no reference answers")
    pred = normalize_answer(prediction)
    refs = list(references)
    if normalize_references:
        refs = [normalize_answer(r) for r in refs]
    elif len(set(refs)) > 1:
        refs = [normalize_punctuation(r) for r in refs]
    if len(refs) == 1:
        return float(refs[0] == pred)
    matches = [r == pred for r in refs]
    total = sum(matches)
    # Leaving out reference j removes one match exactly when reference j itself matched.
    per_subset = [min((total - int(m)) / 3.0, 1.0) for m in matches]
    return sum(per_subset) / len(per_subset)


def vqa_scores(
    predictions: Mapping[object, str],
    ground_truth: Mapping[object, Mapping[str, object]],
    normalize_references: bool = False,
) -> dict[str, object]:
    """Accuracy (in %) over a set of questions, overall and per answer / question type.

    ``predictions``: question_id -> predicted answer. ``ground_truth``: question_id ->
    {"answers": [str, ...], optional "answer_type", optional "question_type"}. Every predicted
    question must have ground truth; questions without a prediction are reported, not scored.
    Returns {"overall": float, "per_answer_type": {...}, "per_question_type": {...},
    "per_question": {qid: accuracy}, "num_questions": int}.
    """
    missing = [qid for qid in predictions if qid not in ground_truth]
    if missing:
        raise KeyError(f"vqa_scores: {len(missing)} predicted question ids have no ground truth, e.g. {missing[:5]}")
    per_question: dict[object, float] = {}
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    for qid, pred in predictions.items():
        gt = ground_truth[qid]
        acc = vqa_accuracy(pred, list(gt["answers"]), normalize_references=normalize_references)
        per_question[qid] = acc
        if gt.get("answer_type") is not None:
            by_answer_type[str(gt["answer_type"])].append(acc)
        if gt.get("question_type") is not None:
            by_question_type[str(gt["question_type"])].append(acc)

    def pct(values: Iterable[float]) -> float:
        values = list(values)
        return 100.0 * sum(values) / len(values) if values else 0.0

    return {
        "overall": pct(per_question.values()),
        "per_answer_type": {k: pct(v) for k, v in sorted(by_answer_type.items())},
        "per_question_type": {k: pct(v) for k, v in sorted(by_question_type.items())},
        "per_question": per_question,
        "num_questions": len(per_question),
    }


def gqa_exact_match(prediction: str, reference: str) -> bool:
    """GQA: exact match after the VQA punctuation / digit / article normalisation of both sides."""
    return normalize_answer(prediction) == normalize_answer(reference)


def gqa_accuracy(predictions: Mapping[object, str], references: Mapping[object, str]) -> float:
    """Exact-match accuracy in % over question ids (every prediction needs a reference)."""
    missing = [qid for qid in predictions if qid not in references]
    if missing:
        raise KeyError(
            f"gqa_accuracy: {len(missing)} predicted question ids have no reference answer, e.g. {missing[:5]}"
        )
    if not predictions:
        return 0.0
    hits = sum(gqa_exact_match(p, references[q]) for q, p in predictions.items())
    return 100.0 * hits / len(predictions)


class AnswerLemmatizer:
    """Lemmatise nouns and verbs of answers with spaCy (OK-VQA evaluation, as in BLIP-2's code).

    spaCy and its English model are optional; they are loaded on first use, with an error saying
    what to install. ``nlp`` may be passed directly (any callable returning spaCy-like tokens).
    """

    def __init__(self, model_name: str = "en_core_web_sm", nlp: Callable | None = None) -> None:
        self.model_name = model_name
        self._nlp = nlp

    def _load(self) -> Callable:
        if self._nlp is None:
            try:
                import spacy  # noqa: PLC0415  (optional dependency, imported lazily)
            except ImportError as err:
                raise ImportError(
                    "Answer lemmatisation (run.lemmatize: true, used for OK-VQA) needs spaCy: "
                    f"pip install spacy && python -m spacy download {self.model_name}"
                ) from err
            try:
                self._nlp = spacy.load(self.model_name)
            except OSError as err:
                raise ImportError(
                    f"spaCy model '{self.model_name}' is not installed: python -m spacy download {self.model_name}"
                ) from err
        return self._nlp

    def __call__(self, answers: Sequence[str]) -> list[str]:
        nlp = self._load()
        out = []
        for answer in answers:
            doc = nlp(answer)
            out.append(" ".join(t.lemma_ if t.pos_ in ("NOUN", "VERB") else t.text for t in doc))
        return out
