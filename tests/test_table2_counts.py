"""Paper Table 2 models built offline on the meta device (``load_model(..., device="meta")``, LLM configs shipped
with the package): trainable and total parameters equal those of the released code's modules, counted here from
the LAVIS module shapes written out (not from our models)."""
from __future__ import annotations

import pytest
import torch

from models import load_model
from models.llm_adapter import shipped_llm_config

BERT_H, BERT_FF, BERT_LAYERS, VOCAB, MAX_POS, QUERIES, EMBED = 768, 3072, 12, 30523, 512, 32, 256


def linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def lavis_qformer_query_path(vision_width: int) -> int:
    """LAVIS Blip2OPT / Blip2T5 Q-Former (cls, word/position embeddings, text FFNs set to None) + query_tokens +
    ln_vision: what stage 2 trains besides the LLM projection."""
    self_attn = 4 * linear(BERT_H, BERT_H) + 2 * BERT_H  # query, key, value, output.dense, output.LayerNorm
    cross_attn = linear(BERT_H, BERT_H) + 2 * linear(vision_width, BERT_H) + linear(BERT_H, BERT_H) + 2 * BERT_H
    query_ffn = linear(BERT_H, BERT_FF) + linear(BERT_FF, BERT_H) + 2 * BERT_H  # intermediate_query, output_query
    layers = BERT_LAYERS * (self_attn + query_ffn) + (BERT_LAYERS // 2) * cross_attn  # cross_attention_freq 2
    return layers + 2 * BERT_H + QUERIES * BERT_H + 2 * vision_width  # embeddings.LayerNorm, query_tokens, ln_vision


def lavis_stage1_trainable(vision_width: int) -> int:
    """Blip2Qformer: the query path + word/position embeddings, text FFNs, cls head (decoder tied to the word
    embeddings, its bias shared), vision_proj, text_proj, itm_head, temp."""
    text = VOCAB * BERT_H + MAX_POS * BERT_H + BERT_LAYERS * (linear(BERT_H, BERT_FF) + linear(BERT_FF, BERT_H) + 2 * BERT_H)
    cls = linear(BERT_H, BERT_H) + 2 * BERT_H + VOCAB
    heads = 2 * linear(BERT_H, EMBED) + linear(BERT_H, 2) + 1
    return lavis_qformer_query_path(vision_width) + text + cls + heads


def eva_vit_g() -> int:  # create_eva_vit_g: 39 blocks, width 1408, FFN 6144, q/v bias, patch 14, 224 px
    w, ff = 1408, 6144
    block = 2 * w + 3 * w * w + 2 * w + linear(w, w) + 2 * w + linear(w, ff) + linear(ff, w)
    return linear(3 * 14 * 14, w) + w + 257 * w + 39 * block


def clip_vit_l() -> int:  # create_clip_vit_L: VisionTransformer(layers=22) -> 21 resblocks, width 1024, no conv bias
    w = 1024
    block = 2 * w + linear(w, 3 * w) + linear(w, w) + 2 * w + linear(w, 4 * w) + linear(4 * w, w)
    return 3 * 14 * 14 * w + w + 257 * w + 2 * w + 21 * block


def opt(name: str) -> int:  # OPTForCausalLM (lm_head tied to embed_tokens; positions offset by 2)
    c = shipped_llm_config(name)
    h, f, v = c["hidden_size"], c["ffn_dim"], c["vocab_size"]
    layer = 4 * linear(h, h) + 2 * h + linear(h, f) + linear(f, h) + 2 * h
    return v * h + (c["max_position_embeddings"] + 2) * h + 2 * h + c["num_hidden_layers"] * layer


def flan_t5(name: str) -> int:  # T5ForConditionalGeneration, gated FFN, untied lm_head, no biases, RMS norms
    c = shipped_llm_config(name)
    d, ff, v, inner = c["d_model"], c["d_ff"], c["vocab_size"], c["num_heads"] * c["d_kv"]
    attn, ffn, rel = 4 * d * inner + d, 3 * d * ff + d, c["relative_attention_num_buckets"] * c["num_heads"]
    encoder = c["num_layers"] * (attn + ffn) + rel + d
    decoder = c["num_decoder_layers"] * (2 * attn + ffn) + rel + d
    return v * d + encoder + decoder + v * d


VIT = {"eva_vit_g": (1408, eva_vit_g), "clip_vit_l": (1024, clip_vit_l)}
LLM = {"facebook/opt-2.7b": opt, "facebook/opt-6.7b": opt, "google/flan-t5-xl": flan_t5,
       "google/flan-t5-xxl": flan_t5}

# (arch, zoo type, image encoder, LLM, paper's trainable parameters in millions); ViT-L + OPT-2.7B has no zoo type
TABLE2 = [
    ("blip2_opt", "pretrain_opt2.7b", "clip_vit_l", "facebook/opt-2.7b", 104),
    ("blip2_opt", "pretrain_opt2.7b", "eva_vit_g", "facebook/opt-2.7b", 107),
    ("blip2_opt", "pretrain_opt6.7b", "eva_vit_g", "facebook/opt-6.7b", 108),
    ("blip2_t5", "pretrain_flant5xl_vitL", "clip_vit_l", "google/flan-t5-xl", 103),
    ("blip2_t5", "pretrain_flant5xl", "eva_vit_g", "google/flan-t5-xl", 107),
    ("blip2_t5", "pretrain_flant5xxl", "eva_vit_g", "google/flan-t5-xxl", 108),
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import huggingface_hub

    def forbidden(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", forbidden)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", forbidden)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_released_formulas_reproduce_the_issue_numbers():
    assert lavis_stage1_trainable(1408) == 186_705_470
    assert lavis_qformer_query_path(1408) + linear(BERT_H, 2560) == 107_133_696


@pytest.mark.slow
@pytest.mark.parametrize("arch,model_type,vit,llm,paper_m", TABLE2, ids=[f"{r[2]}+{r[3]}" for r in TABLE2])
def test_table2_counts_on_meta_equal_the_released_code(arch, model_type, vit, llm, paper_m):
    model = load_model(arch, model_type, device="meta", vit_model=vit)
    assert model.device.type == "meta" and model.llm.model_name_or_path == llm
    counts = model.parameter_counts()
    width, vit_params = VIT[vit]
    hidden = model.llm.hidden_size
    trainable = lavis_qformer_query_path(width) + linear(BERT_H, hidden)
    assert counts["trainable"] == trainable, (counts, trainable)
    assert round(trainable / 1e6) == paper_m  # the paper's Table 2 column
    assert counts["total"] == vit_params() + trainable + LLM[llm](llm), counts


@pytest.mark.slow
@pytest.mark.parametrize("model_type,width", [("pretrain", 1408), ("pretrain_vitL", 1024)])
def test_stage1_counts_on_meta_equal_the_released_code(model_type, width):
    counts = load_model("blip2", model_type, device="meta").parameter_counts()
    assert counts["trainable"] == lavis_stage1_trainable(width), counts
    assert counts["total"] == counts["trainable"] + (eva_vit_g() if width == 1408 else clip_vit_l())
