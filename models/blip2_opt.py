"""``blip2_opt``: BLIP-2 with a frozen decoder-only LLM (OPT by default; any ``hf_causal_lm`` by config).

The projected queries are a soft prompt in front of the text: ``[Z (Q tokens) | prompt | target | pad]``.
Captioning (LAVIS): ``text_input`` already begins with the prompt (``blip_caption`` prepends it); the prompt
tokens (BOS included) are masked out of the loss. With an empty prompt (stage-2 pre-training) every text token is
scored, the first one (OPT's BOS ``</s>``) predicted from the last query, as LAVIS and ``transformers``'
``Blip2ForConditionalGeneration`` do; ``mask_bos: true`` leaves that token out of the loss. Question answering: ``text_input`` is the question (formatted with
``prompt`` when it has a ``{}``) and ``text_output`` the answer, or ``answers``/``weights`` for weighted answers.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

import registry
from models import dist
from models.blip2_stage2 import Blip2LLMBase

@registry.models.register("blip2_opt")
class Blip2OPT(Blip2LLMBase):
    """BLIP-2 stage 2 with OPT (LAVIS names: ``opt_model``, ``opt_proj``)."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        "pretrain_opt2.7b": "configs/blip2_pretrain_opt2.7b.yaml",
        "pretrain_opt6.7b": "configs/blip2_pretrain_opt6.7b.yaml",
        "caption_coco_opt2.7b": "configs/blip2_caption_opt2.7b.yaml",
        "caption_coco_opt6.7b": "configs/blip2_caption_opt6.7b.yaml",
        "tiny": "configs/blip2_opt_tiny.yaml",
    }
    LLM_ATTR = "opt_model"
    PROJ_ATTR = "opt_proj"
    LLM_NAME_KEY = "opt_model"
    DEFAULT_LLM_TYPE = "opt"
    EXPECT_ENCODER_DECODER = False

    def __init__(self, *args: Any, mask_bos: bool = False, **kwargs: Any) -> None:
        """``mask_bos``: with an empty prompt, keep the first text token (BOS) out of the caption loss. False (the
        released code) scores it; True is an option: BOS is the same token after every image, so scoring it only
        teaches the last query to predict a constant."""
        if not isinstance(mask_bos, bool):
            raise ValueError(f"model.mask_bos must be true or false, got {mask_bos!r}")
        super().__init__(*args, **kwargs)
        self.mask_bos = mask_bos

    # -- token layout ---------------------------------------------------------------------------------------------
    @property
    def end_token_id(self) -> int:
        """Token closing a target: "\\n" for OPT (as BLIP-2 trains it), else the LLM's eos."""
        return self.llm.eos_token_ids[0]

    def _prompt_ids(self, prompt: str) -> list[int]:
        return self.llm.tokenizer(prompt, truncation=True, max_length=self.max_txt_len).input_ids

    def target_ids(self, prompt: str, answers: Sequence[str]) -> list[list[int]]:
        # Byte-level BPE: a word that follows text carries its leading space ("Answer: two" -> "Ġtwo").
        sep = " " if prompt and not prompt[-1].isspace() else ""
        ids = self.llm.tokenizer([sep + a for a in answers], add_special_tokens=False, truncation=True,
                                 max_length=self.max_txt_len).input_ids
        return [row + [self.end_token_id] for row in ids]

    def _pad(self, rows: list[list[int]], left: bool, fill: int) -> Tensor:
        width = max((len(r) for r in rows), default=0)
        padded = [([fill] * (width - len(r)) + r) if left else (r + [fill] * (width - len(r))) for r in rows]
        return torch.tensor(padded, dtype=torch.long, device=self.device).view(len(rows), width)

    def _sequence(self, soft: Tensor, rows: list[list[int]], labels: list[list[int]] | None, left: bool):
        """[soft | token rows padded to the longest] -> (inputs_embeds, attention_mask, labels)."""
        ids = self._pad(rows, left, self.llm.pad_token_id)  # [B, T]
        atts = self._pad([[1] * len(r) for r in rows], left, 0)
        embeds = torch.cat([soft, self.llm.embed_tokens(ids).to(soft.dtype)], dim=1)  # [B, Q + T, H]
        soft_atts = torch.ones(soft.shape[:2], dtype=torch.long, device=soft.device)
        atts = torch.cat([soft_atts, atts], dim=1)
        if labels is None:
            return embeds, atts, None
        targets = torch.cat([torch.full(soft.shape[:2], -100, device=soft.device), self._pad(labels, left, -100)], 1)
        return embeds, atts, targets

    # -- hooks used by generate / predict_answers / rank -----------------------------------------------------------
    def lm_inputs(self, soft: Tensor, prompts: Sequence[str], targets: Sequence[str]) -> dict[str, Tensor]:
        rows, labels = [], []
        for prompt, target in zip(prompts, targets):
            p, t = self._prompt_ids(prompt), self.target_ids(prompt, [target])[0]
            rows.append(p + t)
            labels.append([-100] * len(p) + t)
        embeds, atts, targets_t = self._sequence(soft, rows, labels, left=False)
        return {"inputs_embeds": embeds, "attention_mask": atts, "labels": targets_t}

    def generation_inputs(self, soft: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        # Left padding keeps each prompt's last token last; OPT positions follow the attention mask.
        embeds, atts, _ = self._sequence(soft, [self._prompt_ids(p) for p in prompts], None, left=True)
        return embeds, atts

    def first_token_log_probs(self, soft: Tensor, prompts: Sequence[str]) -> Tensor:
        embeds, atts = self.generation_inputs(soft, prompts)
        return self.llm(embeds, atts).logits[:, -1].float().log_softmax(-1)  # [B, V]

    # -- training ------------------------------------------------------------------------------------------------------
    def caption_inputs(self, soft: Tensor, texts: Sequence[str]) -> dict[str, Tensor]:
        """LAVIS captioning layout: ``text + end`` scored, the first ``len(prompt tokens)`` (BOS included) not; with
        no prompt everything is scored, BOS too (unless ``mask_bos``)."""
        tok = self.llm.tokenizer
        num_prompt = len(self._prompt_ids(self.prompt)) if self.prompt else 0
        rows, labels = [], []
        for text in texts:
            ids = tok(text, truncation=True, max_length=self.max_txt_len).input_ids + [self.end_token_id]
            masked = num_prompt if self.prompt else int(self.mask_bos and bool(ids) and ids[0] == tok.bos_token_id)
            masked = min(masked, len(ids))  # a caption shorter than the prompt: nothing left to score
            rows.append(ids)
            labels.append([-100] * masked + ids[masked:])
        embeds, atts, targets = self._sequence(soft, rows, labels, left=False)
        return {"inputs_embeds": embeds, "attention_mask": atts, "labels": targets}

    def forward(self, samples: Mapping[str, Any], return_logits: bool = False) -> dict[str, Tensor]:
        """LM loss of the text given the image queries: ``{"loss"}`` (+ ``"logits"`` [B, Q+T, V])."""
        texts = samples["text_input"]
        batch = self._batch_size(samples)
        texts = self._texts(texts, batch, "samples['text_input']")
        if "text_output" in samples or "answers" in samples:  # question -> answer
            prompts = self.format_prompts(self._question_prompt(), texts)
            soft = self.soft_prompt(samples, texts)
            if "text_output" not in samples:
                return {"loss": self.weighted_answer_loss(samples, prompts, soft)}
            inputs = self.lm_inputs(soft, prompts, self._texts(samples["text_output"], batch, "samples['text_output']"))
        else:  # captioning: the Q-Former may only see the prompt, never the caption it must produce
            soft = self.soft_prompt(samples, [self.prompt] * batch if self.qformer_text_input else None)
            inputs = self.caption_inputs(soft, texts)
        out = self.llm(**inputs, return_logits=return_logits)
        result = {"loss": dist.global_token_mean(out.loss, out.num_tokens.sum())}  # global-batch token mean
        if return_logits:
            result["logits"] = out.logits
        return result
