"""The registered frozen-LLM adapters: ``opt``, ``flan_t5`` (the paper's LLMs), ``hf_causal_lm`` and
``hf_seq2seq_lm`` (any Hugging Face causal / seq2seq checkpoint).

Each is a thin subclass of ``models.llm_adapter.FrozenLLM`` / ``FrozenSeq2SeqLM`` that sets the Hugging Face class,
the GPU precision and what its checkpoints need (OPT's stop at "\\n", Flan-T5's untied LM head and activation).
"""
from __future__ import annotations

from typing import Any

import torch

import registry
from models.llm_adapter import FrozenLLM, FrozenSeq2SeqLM
from models.lm_weights import untie_lm_head


@registry.llms.register("opt")
class OPTLLM(FrozenLLM):
    """OPT (``OPTForCausalLM``): fp16 on GPU by default; generation stops at "\\n" as in BLIP-2."""

    auto_model_name = "OPTForCausalLM"
    gpu_precision = "fp16"

    def __init__(self, model_name_or_path: str = "facebook/opt-2.7b", precision: str | None = "auto",
                 freeze: bool = True, *, stop_at_newline: bool = True, **kwargs: Any) -> None:
        super().__init__(model_name_or_path, precision, freeze, stop_at_newline=stop_at_newline, **kwargs)


@registry.llms.register("flan_t5")
class FlanT5LLM(FrozenSeq2SeqLM):
    """Flan-T5 (``T5ForConditionalGeneration``): bf16 on GPU by default.

    transformers 5 always ties ``lm_head`` to ``shared`` when building a T5 from a config, while
    Flan-T5 checkpoints are untied: loading one into a tied model would silently overwrite the
    input embeddings with the output projection. We untie right after construction.
    """

    auto_model_name = "T5ForConditionalGeneration"
    gpu_precision = "bf16"

    def __init__(self, model_name_or_path: str = "google/flan-t5-xl", precision: str | None = "auto",
                 freeze: bool = True, *, dense_act_fn: str | None = "gelu", **kwargs: Any) -> None:
        """``dense_act_fn``: the feed-forward activation. ``"gelu"`` (default) as the released BLIP-2 code builds
        Flan-T5 (LAVIS ``blip2_t5.py``: ``t5_config.dense_act_fn = "gelu"``) and the released BLIP-2 T5 checkpoints
        were trained, while the hub's flan-t5 configs say ``gelu_new``; it replaces the activation of a config read
        from ``model_name_or_path``. ``None`` keeps that config's activation. A ``config`` passed explicitly (e.g.
        a Hugging Face BLIP-2 checkpoint's ``text_config``, which says ``"gelu"``) is used as it is."""
        self._dense_act_fn = dense_act_fn
        super().__init__(model_name_or_path, precision, freeze, **kwargs)

    def _load_config(self, config: Any):
        hf_config = super()._load_config(config)
        if config is None and self._dense_act_fn is not None:
            # transformers' model/config modules: seconds to import, loaded on first use
            from transformers.activations import ACT2FN

            if self._dense_act_fn not in ACT2FN:
                raise ValueError(f"flan_t5 dense_act_fn={self._dense_act_fn!r} is not a transformers activation; "
                                 f"expected e.g. 'gelu' (BLIP-2), 'gelu_new' or null (keep the config's)")
            hf_config.dense_act_fn = self._dense_act_fn
        return hf_config

    def _after_build(self) -> None:
        untie_lm_head(self.model)

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        """Tied checkpoints (original T5) lack ``lm_head.weight``: use ``shared.weight`` for it."""
        return super().load_hf_state_dict(_fill_lm_head(state_dict), strict=strict)


@registry.llms.register("hf_causal_lm")
class HFCausalLM(FrozenLLM):
    """Any ``AutoModelForCausalLM`` checkpoint (Llama, Qwen, GPT-2, ...) as the frozen LLM."""


@registry.llms.register("hf_seq2seq_lm")
class HFSeq2SeqLM(FrozenSeq2SeqLM):
    """Any ``AutoModelForSeq2SeqLM`` checkpoint (T5, BART, ...) as the frozen LLM."""

    def _after_build(self) -> None:
        # T5-family configs are force-tied by transformers 5; untie when the checkpoint is untied.
        if getattr(self.model.config, "model_type", "") in ("t5", "mt5", "umt5") and not getattr(
            self.model.config, "scale_decoder_outputs", True
        ):
            untie_lm_head(self.model)

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        return super().load_hf_state_dict(_fill_lm_head(state_dict), strict=strict)


def _fill_lm_head(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "lm_head.weight" not in state_dict and "shared.weight" in state_dict:
        return {**state_dict, "lm_head.weight": state_dict["shared.weight"]}
    return state_dict
