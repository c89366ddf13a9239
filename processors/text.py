"""Caption and question cleaning, with the semantics of the original BLIP/BLIP-2 code.

``clean_caption``: lowercase, the characters ``.!"()*#:;~`` become spaces, every run of whitespace
becomes one space, the ends are stripped, and at most ``max_words`` space-separated words are kept.
``clean_question`` does the same except that those characters are deleted.
(LAVIS collapses only runs of 2+ whitespace characters and does not collapse whitespace in
questions at all; here every whitespace run is normalised, so a lone tab or newline also becomes
a space. For ordinary text the results are identical.)
"""
from __future__ import annotations

import re
from typing import ClassVar

import registry
from processors.base import BaseProcessor

_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_WHITESPACE = re.compile(r"\s+")


def _check_text(text: object, what: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}: {text!r}")
    return text


def _truncate(text: str, max_words: int | None) -> str:
    if max_words is None:
        return text
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def clean_caption(caption: str, max_words: int | None = 50) -> str:
    """Normalise a caption: lowercase, punctuation -> space, whitespace collapsed, first max_words words."""
    text = _PUNCTUATION.sub(" ", _check_text(caption, "caption").lower())
    text = _WHITESPACE.sub(" ", text).strip()
    return _truncate(text, max_words)


def clean_question(question: str, max_words: int | None = 50) -> str:
    """Normalise a question: lowercase, punctuation deleted, whitespace collapsed, first max_words words."""
    text = _PUNCTUATION.sub("", _check_text(question, "question").lower())
    text = _WHITESPACE.sub(" ", text).strip()
    return _truncate(text, max_words)


def _check_max_words(max_words: int | None) -> int | None:
    if max_words is not None and (not isinstance(max_words, int) or max_words < 1):
        raise ValueError(f"max_words must be a positive integer or null, got {max_words!r}")
    return max_words


@registry.processors.register("blip_caption")
class BlipCaptionProcessor(BaseProcessor):
    """``prompt + clean_caption(caption)``; the prompt is used verbatim (e.g. ``"a photo of "``)."""

    CONFIG_KEYS: ClassVar[tuple[str, ...]] = ("prompt", "max_words")

    def __init__(self, prompt: str = "", max_words: int | None = 50) -> None:
        self.prompt = _check_text(prompt, "prompt")
        self.max_words = _check_max_words(max_words)

    def __call__(self, caption: str) -> str:
        return self.prompt + clean_caption(caption, self.max_words)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prompt={self.prompt!r}, max_words={self.max_words})"


@registry.processors.register("blip_question")
class BlipQuestionProcessor(BaseProcessor):
    """``clean_question(question)`` (no prompt: VQA prompts are applied by the task/model)."""

    CONFIG_KEYS: ClassVar[tuple[str, ...]] = ("max_words",)

    def __init__(self, max_words: int | None = 50) -> None:
        self.max_words = _check_max_words(max_words)

    def __call__(self, question: str) -> str:
        return clean_question(question, self.max_words)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_words={self.max_words})"
