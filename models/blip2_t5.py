"""``blip2_t5``: BLIP-2 with a frozen encoder-decoder LLM (Flan-T5 by default; any ``hf_seq2seq_lm`` by config).

Prefix LM (paper, section 3.3): the encoder reads ``[Z (Q tokens) | text_input]``, the decoder is trained to
produce ``text_output``. A caption batch without ``text_output`` is split in two: at the prompt (the encoder gets
e.g. "a photo of", the decoder the rest; the whole caption when there is no prompt), or, with
``prefix_lm_split: random``, at a random word boundary while training, as the paper pre-trains.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

import registry
from models import dist
from models.blip2_stage2 import Blip2LLMBase


@registry.models.register("blip2_t5")
class Blip2T5(Blip2LLMBase):
    """BLIP-2 stage 2 with Flan-T5 (LAVIS names: ``t5_model``, ``t5_proj``)."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        "pretrain_flant5xl": "configs/blip2_pretrain_flant5xl.yaml",
        "pretrain_flant5xl_vitL": "configs/blip2_pretrain_flant5xl_vitL.yaml",
        "pretrain_flant5xxl": "configs/blip2_pretrain_flant5xxl.yaml",
        "caption_coco_flant5xl": "configs/blip2_caption_flant5xl.yaml",
        "tiny": "configs/blip2_t5_tiny.yaml",
    }
    LLM_ATTR = "t5_model"
    PROJ_ATTR = "t5_proj"
    LLM_NAME_KEY = "t5_model"
    DEFAULT_LLM_TYPE = "flan_t5"
    EXPECT_ENCODER_DECODER = True
    ANSWER_LENGTH_PENALTY = -1.0

    #: how a caption without ``text_output`` is split (``prefix_lm_split``): ``prompt`` (the prompt prefix to the
    #: encoder) or ``random`` (paper, section 3.3: a random word boundary while training; ``prompt`` in eval)
    PREFIX_SPLITS = ("prompt", "random")

    def __init__(self, *args: Any, prefix_lm_split: str | None = "prompt", **kwargs: Any) -> None:
        split = prefix_lm_split or "prompt"  # null: the default
        if split not in self.PREFIX_SPLITS:
            raise ValueError(f"model.prefix_lm_split must be one of {self.PREFIX_SPLITS}, got {split!r}")
        super().__init__(*args, **kwargs)
        self.prefix_lm_split = split

    # -- token layout ---------------------------------------------------------------------------------------------
    def _tokens(self, texts: Sequence[str]):
        return self.llm.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_txt_len,
                                  return_tensors="pt").to(self.device)

    def _encoder_inputs(self, soft: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """[soft | prompt tokens (eos-terminated), padded to the longest] -> (inputs_embeds, attention_mask)."""
        tokens = self._tokens(prompts)
        embeds = torch.cat([soft, self.llm.embed_tokens(tokens.input_ids).to(soft.dtype)], dim=1)  # [B, Q + T, H]
        soft_atts = torch.ones(soft.shape[:2], dtype=tokens.attention_mask.dtype, device=soft.device)
        return embeds, torch.cat([soft_atts, tokens.attention_mask], dim=1)

    def target_ids(self, prompt: str, answers: Sequence[str]) -> list[list[int]]:
        return self.llm.tokenizer(list(answers), truncation=True, max_length=self.max_txt_len).input_ids  # + eos

    # -- hooks used by generate / predict_answers / rank -----------------------------------------------------------
    def lm_inputs(self, soft: Tensor, prompts: Sequence[str], targets: Sequence[str]) -> dict[str, Tensor]:
        embeds, atts = self._encoder_inputs(soft, prompts)
        target = self._tokens(targets)
        labels = target.input_ids.masked_fill(target.attention_mask == 0, -100)  # [B, T_out]
        return {"inputs_embeds": embeds, "attention_mask": atts, "labels": labels,
                "decoder_attention_mask": target.attention_mask}

    def generation_inputs(self, soft: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        return self._encoder_inputs(soft, prompts)

    def first_token_log_probs(self, soft: Tensor, prompts: Sequence[str]) -> Tensor:
        embeds, atts = self._encoder_inputs(soft, prompts)
        start = torch.full((soft.shape[0], 1), self.llm.pad_token_id, dtype=torch.long, device=soft.device)
        return self.llm(embeds, atts, labels=start).logits[:, 0].float().log_softmax(-1)  # [B, V]

    # -- training ------------------------------------------------------------------------------------------------------
    def split_caption(self, caption: str) -> tuple[str, str]:
        """(encoder text, decoder target) of a caption (see ``prefix_lm_split``); the target keeps >= 1 word."""
        if self.prefix_lm_split == "random" and self.training:
            words = caption.split()
            cut = int(torch.randint(0, max(len(words), 1), ()).item())  # words[:cut] -> encoder
            return " ".join(words[:cut]), " ".join(words[cut:])
        prompt = self.prompt.strip()
        if prompt and "{}" not in prompt and caption.startswith(prompt):
            return prompt, caption[len(prompt):].strip()
        return "", caption

    def forward(self, samples: Mapping[str, Any], return_logits: bool = False) -> dict[str, Tensor]:
        """Prefix-LM loss: ``{"loss"}`` (+ ``"logits"`` [B, T_out, V])."""
        batch = self._batch_size(samples)
        texts = self._texts(samples["text_input"], batch, "samples['text_input']")
        if "text_output" in samples or "answers" in samples:
            prompts = self.format_prompts(self._question_prompt(), texts)
            soft = self.soft_prompt(samples, texts)
            if "text_output" not in samples:
                return {"loss": self.weighted_answer_loss(samples, prompts, soft)}
            targets = self._texts(samples["text_output"], batch, "samples['text_output']")
        else:
            prompts, targets = map(list, zip(*(self.split_caption(t) for t in texts)))
            soft = self.soft_prompt(samples, prompts if self.qformer_text_input else None)
        out = self.llm(**self.lm_inputs(soft, prompts, targets), return_logits=return_logits)
        result = {"loss": dist.global_token_mean(out.loss, out.num_tokens.sum())}  # global-batch token mean
        if return_logits:
            result["logits"] = out.logits
        return result
