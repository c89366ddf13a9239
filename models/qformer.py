"""The registered Q-Formers: ``bert_qformer`` (BLIP-2's: the ``QFormerModel`` body + a tied LM head) and
``instruct_qformer`` (InstructBLIP's, instruction-aware).

The layers are in ``models/qformer_layers.py``, the config/cache/output types in ``models/qformer_config.py``, the
initialisation from a BERT checkpoint and the tokenizer in ``models/qformer_init.py``, decoding in
``models/qformer_decoding.py``.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import registry
from models.qformer_config import QFormerCache, QFormerConfig, QFormerLMOutput
from models.qformer_init import load_bert_state_dict, qformer_from_bert
from models.qformer_layers import QFormerModel, QFormerOnlyMLMHead


@registry.qformers.register("bert_qformer", "qformer")
class QFormer(nn.Module):
    """Q-Former with LM head (LAVIS ``Qformer``): ``bert`` body + ``cls`` head tied to the word embeddings.

    The built-in entry of ``registry.qformers``; variants subclass it (see ARCHITECTURE.md, Q-Former contract).
    """

    #: dataclass of this variant's sizes; ``model.qformer_config`` is validated against its fields
    config_class: ClassVar[type] = QFormerConfig
    #: True when the instruction (prompt / question) enters the Q-Former with the queries in every stage-2 pass
    #: (InstructBLIP); stage-2 models then keep the text path and feed it the prompt
    instruction_aware: ClassVar[bool] = False

    def __init__(self, cfg: QFormerConfig | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if not isinstance(cfg, self.config_class):
            cfg = self.config_class.from_dict(cfg)
        self.config = cfg
        self.bert = QFormerModel(cfg)
        self.cls = QFormerOnlyMLMHead(cfg)
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        """Share the LM decoder weight with the word embeddings (also after loading or resizing)."""
        if self.cls is not None and self.bert.embeddings.word_embeddings is not None:
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    @property
    def has_text_input(self) -> bool:
        return self.bert.embeddings.word_embeddings is not None

    def remove_text_modules(self, keep_text_input: bool = False) -> None:
        """Drop what a stage-2 model never uses: the LM head, and unless ``keep_text_input`` (question-conditioned
        Q-Former) also word/position embeddings and the text FFNs. Matches LAVIS stage-2 state dicts."""
        self.cls = None
        if not keep_text_input:
            self.bert.embeddings.word_embeddings = None
            self.bert.embeddings.position_embeddings = None
            for layer in self.bert.encoder.layer:
                layer.intermediate = None
                layer.output = None

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.config.gradient_checkpointing = enabled
        self.bert.encoder.gradient_checkpointing = enabled

    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow/shrink the vocabulary; new rows start at the mean embedding, new LM biases at 0."""
        old = self.bert.embeddings.word_embeddings
        if old is None or old.num_embeddings == vocab_size:
            return
        keep = min(old.num_embeddings, vocab_size)
        new = nn.Embedding(vocab_size, old.embedding_dim, padding_idx=old.padding_idx).to(old.weight)
        with torch.no_grad():
            new.weight[:keep] = old.weight[:keep]
            new.weight[keep:] = old.weight.mean(0, keepdim=True)
        self.bert.embeddings.word_embeddings = new
        self.config.vocab_size = vocab_size
        if self.cls is not None:
            pred = self.cls.predictions
            bias = torch.zeros(vocab_size, dtype=pred.bias.dtype, device=pred.bias.device)
            bias[:keep] = pred.bias.detach()[:keep]
            pred.bias = nn.Parameter(bias)
            pred.decoder = nn.Linear(old.embedding_dim, vocab_size, bias=False).to(old.weight)
            pred.decoder.bias = pred.bias
        self.tie_weights()

    def forward(
        self,
        input_ids: Tensor | None = None,  # [B, T]
        attention_mask: Tensor | None = None,  # [B, past + Q + T]
        query_embeds: Tensor | None = None,  # [B, Q, H]
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        past_key_values: QFormerCache | None = None,
        labels: Tensor | None = None,  # [B, T], -100 = ignored; position t predicts token t+1
        use_cache: bool = False,
        label_smoothing: float = 0.1,
        reduction: str = "mean",
        return_logits: bool = True,
    ) -> QFormerLMOutput:
        """Causal LM over the text positions (ITG / captioning): logits [B, T, vocab], shifted CE loss when labels.

        ``reduction``: ``mean`` over target tokens, ``sum`` over them, or ``none`` (per-sample sums, as LAVIS).
        ``return_logits=False`` (with labels, mean/sum): the vocabulary projection runs on target positions only.
        """
        if self.cls is None:
            raise RuntimeError("this Q-Former had its LM head removed (stage-2); it cannot decode text")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        out = self.bert(
            input_ids=input_ids,
            query_embeds=query_embeds,
            attention_mask=attention_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            causal=True,
        )
        num_query = query_embeds.shape[1] if query_embeds is not None else 0
        text_hidden = out.last_hidden_state[:, num_query:]  # [B, T, H]
        if labels is not None and not return_logits and reduction != "none":
            targets = labels[:, 1:]
            valid = targets != -100
            picked = self.cls(text_hidden[:, :-1][valid])  # [n_targets, V]
            loss = F.cross_entropy(picked.float(), targets[valid], label_smoothing=label_smoothing,
                                   reduction=reduction)
            return QFormerLMOutput(logits=None, loss=loss, past_key_values=out.past_key_values)
        logits = self.cls(text_hidden)  # [B, T, V]
        loss = None
        if labels is not None:
            targets = labels[:, 1:]
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                targets.reshape(-1),
                ignore_index=-100,
                label_smoothing=label_smoothing,
                reduction="mean" if reduction == "mean" else "none",
            )
            if reduction == "none":  # per-sample sum, as LAVIS
                loss = loss.view(targets.shape).sum(1)
            elif reduction == "sum":  # over every token (the caller normalises, e.g. across ranks)
                loss = loss.sum()
        return QFormerLMOutput(logits=logits, loss=loss, past_key_values=out.past_key_values)

    # -- initialisation from BERT (models/qformer_init.py) ---------------------------------------------------------
    @classmethod
    def from_bert(cls, source: str, encoder_width: int, cross_attention_freq: int = 2, num_query_token: int = 32,
                  vocab_size: int | None = None, load_weights: bool = True, **overrides: Any) -> "QFormer":
        """A Q-Former initialised from a Hugging Face BERT (hub id or local dir): text FFN copied into the query
        FFN, cross-attention random (paper, section 3.1); see ``models.qformer_init.qformer_from_bert``."""
        return qformer_from_bert(cls, source, encoder_width, cross_attention_freq, num_query_token, vocab_size,
                                 load_weights, **overrides)

    def load_bert_state_dict(self, state: Mapping[str, Tensor]) -> list[str]:
        """Copy HF BERT weights (``bert.*``/``cls.*``) into this Q-Former; returns the copied keys."""
        return load_bert_state_dict(self, state)


@registry.qformers.register("instruct_qformer")
class InstructQFormer(QFormer):
    """InstructBLIP's instruction-aware Q-Former (LAVIS ``blip2_*_instruct``, HF ``InstructBlipQFormerModel``).

    The same network as BLIP-2's; the instruction's tokens enter the self-attention with the queries
    (bidirectional mask, one pass), so the query outputs depend on the instruction. Only the query outputs go on.
    """

    instruction_aware = True
