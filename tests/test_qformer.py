"""Q-Former: masks of the three objectives, KV cache, BERT initialisation, LAVIS names, tokenizer."""
from __future__ import annotations

import pytest
import torch

from models.qformer import QFormer
from models.qformer_config import QFormerConfig
from models.qformer_init import init_tokenizer
from models.qformer_layers import self_attention_mask

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            encoder_width=24, num_query_token=4, vocab_size=50, max_position_embeddings=40)


@pytest.fixture
def qformer() -> QFormer:
    torch.manual_seed(0)
    return QFormer(TINY).eval()


def _inputs(batch: int = 2, text_len: int = 6):
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(batch, 4, 32, generator=g)
    image = torch.randn(batch, 7, 24, generator=g)
    ids = torch.randint(5, 50, (batch, text_len), generator=g)
    return queries, image, ids


def _causal(q: QFormer, queries, image, ids):
    att = torch.ones(ids.shape[0], queries.shape[1] + ids.shape[1], dtype=torch.long)
    return q.bert(input_ids=ids, query_embeds=queries, attention_mask=att, encoder_hidden_states=image,
                  causal=True).last_hidden_state


def test_itg_text_cannot_see_later_text(qformer):
    queries, image, ids = _inputs()
    base = _causal(qformer, queries, image, ids)
    changed = ids.clone()
    changed[:, 4] = (changed[:, 4] + 7) % 50
    out = _causal(qformer, queries, image, changed)
    nq = queries.shape[1]
    torch.testing.assert_close(out[:, : nq + 4], base[:, : nq + 4], rtol=0, atol=1e-6)  # queries + text 0..3
    assert (out[:, nq + 4 :] - base[:, nq + 4 :]).abs().max() > 1e-3  # the changed token and later ones move


def test_itg_logits_unchanged_by_later_tokens(qformer):
    queries, image, ids = _inputs()
    att = torch.ones(2, 4 + 6, dtype=torch.long)
    base = qformer(ids, att, query_embeds=queries, encoder_hidden_states=image).logits
    changed = ids.clone()
    changed[:, 5] = 1
    out = qformer(changed, att, query_embeds=queries, encoder_hidden_states=image).logits
    torch.testing.assert_close(out[:, :5], base[:, :5], rtol=0, atol=1e-6)
    assert (out[:, 5] - base[:, 5]).abs().max() > 1e-3


def test_queries_cannot_see_text_under_itg_and_itc(qformer):
    queries, image, ids = _inputs()
    query_only = qformer.bert(query_embeds=queries, encoder_hidden_states=image).last_hidden_state  # ITC pass
    with_text = _causal(qformer, queries, image, ids)[:, :4]  # ITG pass
    torch.testing.assert_close(with_text, query_only, rtol=0, atol=1e-5)
    # The ITC text pass takes no queries and no image: it depends on the text only.
    text_a = qformer.bert(input_ids=ids).last_hidden_state
    text_b = qformer.bert(input_ids=ids).last_hidden_state
    torch.testing.assert_close(text_a, text_b)
    # Under the bidirectional (ITM) mask the queries do see the text: the test above can fail.
    att = torch.ones(2, 10, dtype=torch.long)
    bidir = qformer.bert(input_ids=ids, query_embeds=queries, attention_mask=att,
                         encoder_hidden_states=image).last_hidden_state[:, :4]
    assert (bidir - query_only).abs().max() > 1e-3


def test_mask_shapes_and_values():
    mask = self_attention_mask(None, num_query=2, num_text=3, past=None, causal=True, device=torch.device("cpu"))
    expected = torch.tensor([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)
    assert self_attention_mask(None, 2, 3, None, causal=False, device=torch.device("cpu")) is None
    pad = torch.tensor([[1, 1, 1, 1, 0]])
    bidir = self_attention_mask(pad, 2, 3, None, causal=False, device=torch.device("cpu"))
    assert bidir.shape == (1, 1, 1, 5) and not bidir[0, 0, 0, 4]


def test_padding_does_not_leak(qformer):
    queries, image, ids = _inputs(batch=1, text_len=4)
    short = qformer(ids, torch.ones(1, 8, dtype=torch.long), query_embeds=queries, encoder_hidden_states=image)
    padded_ids = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    att = torch.cat([torch.ones(1, 8), torch.zeros(1, 3)], 1).long()
    padded = qformer(padded_ids, att, query_embeds=queries, encoder_hidden_states=image)
    torch.testing.assert_close(padded.logits[:, :4], short.logits, rtol=0, atol=1e-5)
    # bidirectional: pad keys are ignored too
    bi_short = qformer.bert(input_ids=ids, query_embeds=queries, attention_mask=torch.ones(1, 8).long(),
                            encoder_hidden_states=image).last_hidden_state
    bi_pad = qformer.bert(input_ids=padded_ids, query_embeds=queries, attention_mask=att,
                          encoder_hidden_states=image).last_hidden_state
    torch.testing.assert_close(bi_pad[:, :8], bi_short, rtol=0, atol=1e-5)


def test_kv_cache_decoding_equals_full_recompute(qformer):
    queries, image, ids = _inputs()
    full = qformer(ids, torch.ones(2, 10, dtype=torch.long), query_embeds=queries, encoder_hidden_states=image).logits
    cache = qformer.bert(query_embeds=queries, encoder_hidden_states=image, use_cache=True).past_key_values
    assert cache.num_query == 4 and cache.length == 4
    # ITG-style: all text at once on top of the query cache
    itg = qformer(ids, torch.ones(2, 10, dtype=torch.long), past_key_values=cache).logits
    torch.testing.assert_close(itg, full, rtol=0, atol=1e-5)
    # incremental decoding, one token at a time
    steps = []
    for t in range(ids.shape[1]):
        out = qformer(ids[:, t : t + 1], torch.ones(2, 4 + t + 1, dtype=torch.long), past_key_values=cache,
                      use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    assert cache.text_length == ids.shape[1]
    # beams: repeat_interleave / index_select keep per-sample caches
    rep = cache.repeat_interleave(3)
    assert rep.layers[0][0].shape[0] == 6
    torch.testing.assert_close(rep.index_select(torch.tensor([3])).layers[1][1], cache.layers[1][1][1:2])


def test_lm_loss_label_smoothing_and_ignore(qformer):
    queries, image, ids = _inputs()
    labels = ids.clone()
    labels[:, -2:] = -100
    att = torch.ones(2, 10, dtype=torch.long)
    out = qformer(ids, att, query_embeds=queries, encoder_hidden_states=image, labels=labels, label_smoothing=0.0)
    logits = out.logits[:, :-1].reshape(-1, 50)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    for reduction in ("mean", "sum"):  # target-only projection gives the same loss
        full = qformer(ids, att, query_embeds=queries, encoder_hidden_states=image, labels=labels, reduction=reduction)
        lean = qformer(ids, att, query_embeds=queries, encoder_hidden_states=image, labels=labels, reduction=reduction,
                       return_logits=False)
        assert lean.logits is None
        torch.testing.assert_close(lean.loss, full.loss)
    per_sample = qformer(ids, att, query_embeds=queries, encoder_hidden_states=image, labels=labels,
                         reduction="none").loss
    assert per_sample.shape == (2,) and torch.isfinite(per_sample).all()


def test_lavis_names_and_state_dict_round_trip(qformer):
    keys = set(qformer.state_dict())
    for key in [
        "bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.LayerNorm.weight", "bert.embeddings.position_ids",
        "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.attention.output.dense.bias",
        "bert.encoder.layer.0.crossattention.self.key.weight", "bert.encoder.layer.2.crossattention.self.value.bias",
        "bert.encoder.layer.1.intermediate_query.dense.weight", "bert.encoder.layer.1.output_query.LayerNorm.bias",
        "bert.encoder.layer.1.intermediate.dense.weight", "bert.encoder.layer.1.output.LayerNorm.weight",
        "cls.predictions.bias", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
        "cls.predictions.transform.dense.weight", "cls.predictions.transform.LayerNorm.weight",
    ]:
        assert key in keys, key
    assert not any("layer.1.crossattention" in k for k in keys)  # cross-attention on even layers only
    assert qformer.state_dict()["bert.encoder.layer.0.crossattention.self.key.weight"].shape == (32, 24)
    # LM head tied to word embeddings
    assert qformer.cls.predictions.decoder.weight is qformer.bert.embeddings.word_embeddings.weight
    other = QFormer(TINY).eval()
    other.load_state_dict(qformer.state_dict(), strict=True)
    assert other.cls.predictions.decoder.weight is other.bert.embeddings.word_embeddings.weight
    queries, image, ids = _inputs()
    att = torch.ones(2, 10, dtype=torch.long)
    torch.testing.assert_close(other(ids, att, query_embeds=queries, encoder_hidden_states=image).logits,
                               qformer(ids, att, query_embeds=queries, encoder_hidden_states=image).logits)


def test_remove_text_modules_matches_stage2_layout(qformer):
    queries, image, _ = _inputs()
    before = qformer.bert(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
    qformer.remove_text_modules()
    keys = set(qformer.state_dict())
    assert not any(k.startswith("cls.") for k in keys)
    assert not any("word_embeddings" in k or "position_embeddings" in k for k in keys)
    assert not any(".intermediate." in k or ".output.dense" in k.replace("attention.output", "") for k in keys)
    assert "bert.embeddings.position_ids" in keys and "bert.encoder.layer.0.output_query.dense.weight" in keys
    after = qformer.bert(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
    torch.testing.assert_close(after, before)
    with pytest.raises(RuntimeError, match="removed"):
        qformer.bert(input_ids=torch.ones(1, 3, dtype=torch.long))


def test_keep_text_input_for_question_conditioning(qformer):
    qformer.remove_text_modules(keep_text_input=True)
    queries, image, ids = _inputs()
    out = qformer.bert(input_ids=ids, query_embeds=queries, attention_mask=torch.ones(2, 10).long(),
                       encoder_hidden_states=image).last_hidden_state
    assert out.shape == (2, 10, 32) and qformer.cls is None


def test_from_bert_copies_weights_and_ffn(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64)
    bert = BertForMaskedLM(config)
    bert.save_pretrained(tmp_path)
    q = QFormer.from_bert(str(tmp_path), encoder_width=20, cross_attention_freq=2, num_query_token=3, vocab_size=61)
    assert q.config.hidden_size == 32 and q.config.num_hidden_layers == 2 and q.config.intermediate_size == 48
    sd, bsd = q.state_dict(), bert.state_dict()
    torch.testing.assert_close(sd["bert.embeddings.word_embeddings.weight"][:60], bsd["bert.embeddings.word_embeddings.weight"])
    for i in range(2):
        for part in ("intermediate.dense.weight", "output.dense.weight", "output.LayerNorm.weight",
                     "attention.self.query.weight", "attention.output.dense.bias"):
            torch.testing.assert_close(sd[f"bert.encoder.layer.{i}.{part}"], bsd[f"bert.encoder.layer.{i}.{part}"])
        for part in ("dense.weight", "dense.bias"):
            torch.testing.assert_close(sd[f"bert.encoder.layer.{i}.intermediate_query.{part}"],
                                       bsd[f"bert.encoder.layer.{i}.intermediate.{part}"])
        torch.testing.assert_close(sd[f"bert.encoder.layer.{i}.output_query.LayerNorm.bias"],
                                   bsd[f"bert.encoder.layer.{i}.output.LayerNorm.bias"])
    assert sd["bert.encoder.layer.0.crossattention.self.key.weight"].shape == (32, 20)
    torch.testing.assert_close(sd["cls.predictions.transform.dense.weight"], bsd["cls.predictions.transform.dense.weight"])
    assert q.cls.predictions.decoder.weight is q.bert.embeddings.word_embeddings.weight
    # the BERT text encoder and ours agree on a text-only pass (no token types in the Q-Former: BERT adds type 0)
    ids = torch.randint(1, 60, (2, 5))
    bert.eval(), q.eval()
    with torch.no_grad():
        bert.bert.embeddings.token_type_embeddings.weight.zero_()
        ref = bert.bert(ids).last_hidden_state
    torch.testing.assert_close(q.bert(input_ids=ids).last_hidden_state, ref, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_same_grads(qformer):
    queries, image, ids = _inputs()
    att = torch.ones(2, 10, dtype=torch.long)
    grads = []
    for ckpt in (False, True):
        qformer.zero_grad()
        qformer.set_gradient_checkpointing(ckpt)
        qformer.train()
        torch.manual_seed(3)
        for m in qformer.modules():  # no dropout so both runs are identical
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        qformer.bert.encoder.layer[0].attention.self.dropout_p = 0.0
        for layer in qformer.bert.encoder.layer:
            layer.attention.self.dropout_p = 0.0
            if layer.has_cross_attention:
                layer.crossattention.self.dropout_p = 0.0
        qformer(ids, att, query_embeds=queries, encoder_hidden_states=image, labels=ids).loss.backward()
        grads.append(qformer.bert.encoder.layer[0].crossattention.self.key.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_config_errors():
    with pytest.raises(KeyError, match="hiden_size.*hidden_size"):
        QFormerConfig.from_dict({"hiden_size": 3})
    with pytest.raises(ValueError, match="divisible"):
        QFormerConfig.from_dict({"hidden_size": 30, "num_attention_heads": 4})


def test_tokenizer_bundled_vocab():
    tok = init_tokenizer("bundled")
    assert len(tok) == 30523 and tok.bos_token == "[DEC]" and tok.bos_token_id == 30522
    ids = tok(["A photo of a cat."], return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.cls_token_id == 101 and ids[0, -1].item() == tok.sep_token_id == 102
    assert tok.convert_ids_to_tokens(ids[0, 1:4].tolist()) == ["a", "photo", "of"]
