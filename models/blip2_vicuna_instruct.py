"""``blip2_vicuna_instruct``: InstructBLIP with a frozen decoder-only LLM (Vicuna in LAVIS; any ``hf_causal_lm``).

LLM sequence (LAVIS ``concat_text_input_output``): ``[Z (Q or T*Q tokens) | instruction | target + eos | pad]``;
the instruction (BOS included) is left-truncated at ``max_txt_len``, the target right-truncated at
``max_output_txt_len`` with its tokenizer-added BOS dropped; only the target is scored. Generation left-pads the
instruction. See ``models/blip2_instruct.py`` for what both InstructBLIP models share.
"""
from __future__ import annotations

import functools
from typing import Sequence

from torch import Tensor

import registry
from models.blip2_instruct import InstructMixin
from models.blip2_opt import Blip2OPT


@registry.models.register("blip2_vicuna_instruct")
class Blip2VicunaInstruct(InstructMixin, Blip2OPT):
    """InstructBLIP (LAVIS names: ``llm_model``, ``llm_proj``)."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        "vicuna7b": "configs/blip2_instruct_vicuna7b.yaml",
        "vicuna13b": "configs/blip2_instruct_vicuna13b.yaml",
        "tiny": "configs/blip2_instruct_tiny.yaml",
    }
    LLM_ATTR = "llm_model"
    PROJ_ATTR = "llm_proj"
    LLM_NAME_KEY = "llm_model"
    DEFAULT_LLM_TYPE = "hf_causal_lm"
    ANSWER_LENGTH_PENALTY = 0.0

    @functools.cached_property
    def _leading_specials(self) -> int:
        """How many special tokens the LLM tokenizer puts before a text (1 for a BOS, as Llama's and OPT's)."""
        tok = self.llm.tokenizer
        with_special, plain = tok("a").input_ids, tok("a", add_special_tokens=False).input_ids
        lead = 0
        while lead < len(with_special) - len(plain) and with_special[lead] != plain[0]:
            lead += 1
        return lead

    def _prompt_ids(self, prompt: str) -> list[int]:
        return self._llm_tokens([prompt], "left", self.max_txt_len)[0]

    def target_ids(self, prompt: str, answers: Sequence[str]) -> list[list[int]]:
        """``answer + eos`` right-truncated at ``max_output_txt_len``, without the BOS (LAVIS ``output_ids[1:]``)."""
        eos = self.llm.tokenizer.eos_token or ""
        rows = self._llm_tokens([a + eos for a in answers], "right", self.max_output_txt_len)
        return [row[self._leading_specials:] for row in rows]

    def generation_inputs(self, soft: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        rows = self._llm_tokens(prompts, "left", None)  # not truncated at generation (LAVIS)
        embeds, atts, _ = self._sequence(soft, rows, None, left=True)
        return embeds, atts
