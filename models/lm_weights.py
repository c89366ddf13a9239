"""Weight tying of Hugging Face language models: giving the LM head its own weight.

Used by the LLM adapters (``models/llms.py``) and the tiny offline LLM builder (``models/tiny.py``).
"""
from __future__ import annotations

from torch import nn


def untie_lm_head(model: nn.Module) -> None:
    """Give ``model.lm_head`` its own weight (a copy of the input embedding if they were shared)
    and drop it from transformers' tying map, so later ``tie_weights()`` calls keep it separate."""
    lm_head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if lm_head is None:
        return
    if lm_head.weight is embed.weight or (
        lm_head.weight.device.type != "meta" and lm_head.weight.data_ptr() == embed.weight.data_ptr()
    ):
        lm_head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        model.all_tied_weights_keys = {k: v for k, v in tied.items() if not k.startswith("lm_head.")}
    # T5 derives "scale decoder outputs" from tie_word_embeddings at config creation; only an
    # untied-style (unscaled, e.g. Flan-T5) config may say untied without changing numerics on reload.
    if not getattr(model.config, "scale_decoder_outputs", False):
        model.config.tie_word_embeddings = False
