"""Case (f) run with the released LAVIS 1.0.2 ``Blip2Qformer``, for the side-by-side ratio (``--frameworks lavis``).

This module runs in a separate virtual environment that holds LAVIS and the library versions it pins
(transformers < 4.27, timm 0.4.12), never in the project's own environment; ``benchmarks/run.py`` starts it with that
environment's interpreter (``--lavis-python``, default ``$BLIP2_LAVIS_PYTHON`` or ``/work/lavis-venv/bin/python``;
setting it up: docs/benchmarks.md). It imports only torch, LAVIS and the benchmark's plain-data modules.

The model is LAVIS's own class with nothing downloaded: the three hub reads of its constructor (the
``bert-base-uncased`` tokenizer and config, the EVA ViT-g checkpoint) are replaced by the benchmark's local
word-level vocabulary (the one ours reads, so both tokenize the captions into the same ids), a ``BertConfig()``
(bert-base-uncased's values) and LAVIS's own EVA ``VisionTransformer`` at the BENCH vision sizes; weights are LAVIS's
random initialisation, seeded. Inputs are the benchmark's images and captions, as in ``ours_cases.py``.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from benchmarks.text import captions, images as _images


def build_blip2_qformer(ckpt: str, dims: dict):
    """LAVIS's ``Blip2Qformer`` at ``dims``' sizes, eval mode, fp32, tokenizer from ``ckpt``'s ``vocab.txt``."""
    from lavis.models.blip2_models import blip2 as lavis_blip2
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer
    from lavis.models.eva_vit import VisionTransformer
    from transformers import BertTokenizer

    vision, qformer = dims["vision"], dims["qformer"]

    def init_tokenizer(cls):
        tokenizer = BertTokenizer(vocab_file=str(Path(ckpt) / "vocab.txt"))
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        return tokenizer

    def init_vision_encoder(cls, model_name, img_size, drop_path_rate, use_grad_checkpoint, precision):
        # create_eva_vit_g's arguments with the BENCH width/depth/heads (it keeps every block it builds)
        encoder = VisionTransformer(
            img_size=img_size, patch_size=vision["patch_size"], use_mean_pooling=False,
            embed_dim=vision["hidden_size"], depth=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
            mlp_ratio=vision["intermediate_size"] / vision["hidden_size"], qkv_bias=vision["qkv_bias"],
            drop_path_rate=drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=vision["layer_norm_eps"]),
            use_checkpoint=use_grad_checkpoint)
        return encoder, lavis_blip2.LayerNorm(encoder.num_features)

    def bert_config(*args, **kwargs):
        return lavis_blip2.BertConfig(hidden_size=qformer["hidden_size"], num_hidden_layers=qformer["num_hidden_layers"],
                                      num_attention_heads=qformer["num_attention_heads"],
                                      intermediate_size=qformer["intermediate_size"])

    def bert_lm_head(*args, config, **kwargs):
        return lavis_blip2.BertLMHeadModel(config)

    patches = [(lavis_blip2.Blip2Base, "init_tokenizer", classmethod(init_tokenizer)),
               (lavis_blip2.Blip2Base, "init_vision_encoder", classmethod(init_vision_encoder)),
               (lavis_blip2.BertConfig, "from_pretrained", staticmethod(bert_config)),
               (lavis_blip2.BertLMHeadModel, "from_pretrained", staticmethod(bert_lm_head))]
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in patches]  # None: inherited
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        torch.manual_seed(0)
        model = Blip2Qformer(vit_model="eva_clip_g", img_size=dims["image_size"], vit_precision="fp32",
                             num_query_token=dims["num_query_tokens"],
                             cross_attention_freq=qformer["cross_attention_frequency"], max_txt_len=dims["max_txt_len"])
    finally:
        for owner, name, value in saved:
            if value is None:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
    model.Qformer.resize_token_embeddings(qformer["vocab_size"])  # the checkpoint's vocabulary size, as ours holds
    return model.eval()


def setup(case: str, ckpt: str, dims: dict, precision: str) -> Callable:
    """A zero-argument callable doing one unit of (f) work with LAVIS: ``extract_features(samples, mode)``."""
    if precision != "fp32":
        raise ValueError(f"the LAVIS cases run in fp32 only (LAVIS autocasts to fp16 on CUDA only), got {precision!r}")
    if not case.startswith("f_") or case == "f_itm":
        raise ValueError(f"no LAVIS benchmark for case {case!r}; LAVIS runs f_image, f_text, f_multimodal")
    model = build_blip2_qformer(ckpt, dims)
    mode, batch = case[2:], dims["batch"]
    samples = {"image": _images(batch, dims["image_size"], seed=2), "text_input": captions(batch, seed=2)}
    if mode == "text":
        samples.pop("image")

    def features():  # extract_features runs under no_grad in LAVIS, as in ours
        return model.extract_features(samples, mode=mode)

    return features
