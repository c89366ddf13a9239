"""``blip2_t5_instruct``: InstructBLIP with a frozen encoder-decoder LLM (Flan-T5; any ``hf_seq2seq_lm``).

The encoder reads ``[Z (Q or T*Q tokens) | instruction]`` (instruction left-truncated at ``max_txt_len``), the
decoder produces the target (right-truncated at ``max_output_txt_len``). At generation the instruction is not
truncated. See ``models/blip2_instruct.py`` for what both InstructBLIP models share.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

import registry
from models.blip2_instruct import InstructMixin
from models.blip2_t5 import Blip2T5


@registry.models.register("blip2_t5_instruct")
class Blip2T5Instruct(InstructMixin, Blip2T5):
    """InstructBLIP with Flan-T5 (LAVIS names: ``t5_model``, ``t5_proj``)."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        "flant5xl": "configs/blip2_instruct_flant5xl.yaml",
        "flant5xxl": "configs/blip2_instruct_flant5xxl.yaml",
        "tiny": "configs/blip2_instruct_t5_tiny.yaml",
    }
    ANSWER_LENGTH_PENALTY = -1.0

    def _encoder_inputs(self, soft: Tensor, prompts: Sequence[str], truncate: bool = True) -> tuple[Tensor, Tensor]:
        tokens = self._llm_tokens(prompts, "left", self.max_txt_len if truncate else None, padded=True)
        embeds = torch.cat([soft, self.llm.embed_tokens(tokens.input_ids).to(soft.dtype)], dim=1)  # [B, Q + T, H]
        soft_atts = torch.ones(soft.shape[:2], dtype=tokens.attention_mask.dtype, device=soft.device)
        return embeds, torch.cat([soft_atts, tokens.attention_mask], dim=1)

    def target_ids(self, prompt: str, answers: Sequence[str]) -> list[list[int]]:
        return self._llm_tokens(answers, "right", self.max_output_txt_len)  # + eos

    def lm_inputs(self, soft: Tensor, prompts: Sequence[str], targets: Sequence[str]) -> dict[str, Tensor]:
        embeds, atts = self._encoder_inputs(soft, prompts)
        target = self._llm_tokens(targets, "right", self.max_output_txt_len, padded=True)
        labels = target.input_ids.masked_fill(target.attention_mask == 0, -100)  # [B, T_out]
        return {"inputs_embeds": embeds, "attention_mask": atts, "labels": labels,
                "decoder_attention_mask": target.attention_mask}

    def generation_inputs(self, soft: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        return self._encoder_inputs(soft, prompts, truncate=False)
