"""InstructBLIP behaviour shared by ``blip2_vicuna_instruct`` and ``blip2_t5_instruct`` (LAVIS ``blip2_*_instruct``).

The instruction is one text that goes to both sides: the instruction-aware Q-Former reads it with the queries
(``instruct_qformer``, BERT tokenizer truncating on the left at ``max_txt_len``), and the LLM reads it after the soft
prompt (LLM tokenizer truncating on the left at ``max_txt_len``); the target is truncated on the right at
``max_output_txt_len``. At generation the instruction is not truncated on the LLM side (as LAVIS).

Where the instruction comes from (our samples): question-answer batches (``text_output`` or ``answers``) use the
question formatted with ``prompt`` when it has a ``{}`` (e.g. "Question: {} Short answer:"); caption batches use
``prompt`` itself as the instruction (e.g. "A short image description:") and the caption as the target.
A video ``samples["image"]`` [B, 3, T, H, W] gives a soft prompt of T * Q tokens (see ``soft_prompt``).
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor


class InstructMixin:
    """Put before ``Blip2OPT`` / ``Blip2T5`` in the bases; needs their ``lm_inputs`` / ``generation_inputs``."""

    DEFAULT_QFORMER: ClassVar[str] = "instruct_qformer"
    #: LAVIS's ``predict_answers`` default length penalty (vicuna: 0, Flan-T5: -1)
    ANSWER_LENGTH_PENALTY: ClassVar[float] = -1.0

    def __init__(self, *args: Any, max_txt_len: int = 128, max_output_txt_len: int = 256,
                 llm_special_tokens: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, max_txt_len=max_txt_len, **kwargs)
        self.max_output_txt_len = int(max_output_txt_len)
        if self.tokenizer is not None:
            self.tokenizer.truncation_side = "left"  # LAVIS: init_tokenizer(truncation_side="left")
        if llm_special_tokens and self.llm.device.type != "meta":
            self._add_llm_special_tokens(dict(llm_special_tokens))

    def _add_llm_special_tokens(self, tokens: dict[str, str]) -> None:
        """LAVIS Vicuna: ``add_special_tokens`` for pad/bos/eos/unk, then the embedding grows to the tokenizer."""
        tok = self.llm.tokenizer
        tok.add_special_tokens(tokens)
        rows = self.llm.model.get_input_embeddings().num_embeddings
        if len(tok) > rows:
            self.llm.model.resize_token_embeddings(len(tok))
            self.llm.model.requires_grad_(False)

    # -- tokenization ------------------------------------------------------------------------------------------------
    def _llm_tokens(self, texts: Sequence[str], side: str, max_length: int | None, padded: bool = False):
        """LLM tokenizer on ``texts``, truncating on ``side`` at ``max_length`` (None: no truncation); a padded
        batch on the model's device, or lists of ids."""
        tok = self.llm.tokenizer
        previous = tok.truncation_side
        tok.truncation_side = side
        try:
            kwargs = dict(truncation=max_length is not None, max_length=max_length)
            if padded:
                return tok(list(texts), padding="longest", return_tensors="pt", **kwargs).to(self.device)
            return tok(list(texts), **kwargs).input_ids
        finally:
            tok.truncation_side = previous

    # -- training ------------------------------------------------------------------------------------------------------
    def forward(self, samples: Mapping[str, Any], return_logits: bool = False) -> dict[str, Tensor]:
        """LM loss of the target given [soft prompt; instruction]: ``{"loss"}`` (+ ``"logits"``)."""
        batch = self._batch_size(samples)
        texts = self._texts(samples["text_input"], batch, "samples['text_input']")
        if "text_output" in samples or "answers" in samples:
            instructions = self.format_prompts(self._question_prompt(), texts)
            targets = None
            if "text_output" in samples:
                targets = self._texts(samples["text_output"], batch, "samples['text_output']")
        else:  # a caption batch: the prompt is the instruction, the caption the target
            instructions, targets = [self.prompt] * batch, texts
        soft = self.soft_prompt(samples, instructions)
        if targets is None:
            return {"loss": self.weighted_answer_loss(samples, instructions, soft)}
        out = self.llm(**self.lm_inputs(soft, instructions, targets), return_logits=return_logits)
        result = {"loss": out.loss}
        if return_logits:
            result["logits"] = out.logits
        return result

    # -- inference -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, samples: Mapping[str, Any], use_nucleus_sampling: bool = False, num_beams: int = 5,
                 max_length: int = 256, min_length: int = 1, top_p: float = 0.9, repetition_penalty: float = 1.5,
                 length_penalty: float = 1.0, num_captions: int = 1, temperature: float = 1.0) -> list[str]:
        """Responses to ``samples["prompt"]`` (one string or one per image; default ``prompt``) with LAVIS's
        InstructBLIP defaults (256 new tokens, repetition penalty 1.5); the Q-Former reads the same instruction."""
        return super().generate(samples, use_nucleus_sampling, num_beams, max_length, min_length, top_p,
                                repetition_penalty, length_penalty, num_captions, temperature)

    def generation_qformer_texts(self, samples: Mapping[str, Any], prompts: list[str]) -> list[str]:
        return prompts

    @torch.no_grad()
    def predict_answers(
        self,
        samples: Mapping[str, Any],
        num_beams: int = 5,
        inference_method: str = "generate",
        max_len: int = 10,
        min_len: int = 1,
        num_ans_candidates: int = 128,
        answer_list: Sequence[str] | None = None,
        prompt: str = "",
        length_penalty: float | None = None,
        repetition_penalty: float = 1.5,
    ) -> list[str]:
        """Answer ``samples["text_input"]``: the questions formatted with ``prompt`` (or the model's ``{}`` prompt)
        are the instructions; ``generate`` as LAVIS (through ``generate``, repetition penalty 1.5), or ``rank``
        over ``answer_list`` (see ``Blip2LLMBase.predict_answers``)."""
        questions = samples["text_input"]
        questions = [questions] if isinstance(questions, str) else list(questions)
        prompts = self.format_prompts(prompt or self._question_prompt(), questions)
        penalty = self.ANSWER_LENGTH_PENALTY if length_penalty is None else length_penalty
        if inference_method == "generate":
            return self.generate({**samples, "prompt": prompts}, num_beams=num_beams, max_length=max_len,
                                 min_length=min_len, length_penalty=penalty, repetition_penalty=repetition_penalty)
        if inference_method == "rank":
            if not answer_list:
                raise ValueError("predict_answers(inference_method='rank') needs a non-empty answer_list")
            soft = self.soft_prompt(samples, prompts)
            return self.rank_answers(soft, prompts, list(answer_list), num_ans_candidates, penalty)
        raise ValueError(f"inference_method must be 'generate' or 'rank', got {inference_method!r}")
