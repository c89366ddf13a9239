"""Numerical parity with Hugging Face ``transformers`` BLIP-2 (no hub: tiny random models built here).

Three reference models, with every weight re-drawn from a seeded normal (HF's default init is degenerate: vision
initializer_range 1e-10, zero query tokens) and saved with ``save_pretrained``:
``Blip2ForConditionalGeneration`` with an OPT text model, with a Flan-T5-style (gated-gelu, untied) text model,
and ``Blip2ForImageTextRetrieval``. Our models are loaded from those directories (``load_hf_blip2``) and must give
the same logits (1e-4, fp32), the same greedy and beam-search (num_beams=3) token ids, and the same ITM/ITC scores.
Then each of our models is exported (``export_to_hf``) and reloaded in ``transformers`` with the same outputs.
"""
from __future__ import annotations

import pytest
import torch

from models import load_hf_blip2
from models.hf_export import export_to_hf

pytestmark = pytest.mark.slow  # three model families, save/load/export: ~30-60 s together on 2 cores

NUM_QUERY = 4
TEXTS = ["a small red circle", "two blue squares to the left of a star"]
ATOL = 1e-4


def redraw_(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Every parameter from a seeded normal; LayerNorm/RMSNorm weights around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            if "norm" in name.lower() and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(std * noise)


def pixels(batch: int = 2, size: int = 28) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))


def blip2_config(text_config: dict, retrieval: bool = False, image_token_index: int | None = None):
    from transformers import Blip2Config

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)
    qformer = dict(vocab_size=30523, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                   encoder_hidden_size=32, cross_attention_frequency=2, max_position_embeddings=64,
                   use_qformer_text_input=retrieval, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text_config,
                       num_query_tokens=NUM_QUERY, image_text_hidden_size=8, image_token_index=image_token_index)


def llm_tokenizer(kind: str):
    from models.tiny import build_tokenizer

    return build_tokenizer(kind)


def build_reference(kind: str, tmp_path_factory):
    """(HF model in eval mode, its save dir, tokenizer) for kind in opt | t5 | itm."""
    from transformers import (Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, OPTConfig, T5Config)

    out = tmp_path_factory.mktemp(f"hf_{kind}")
    tokenizer = None
    if kind == "itm":
        config = blip2_config(OPTConfig().to_dict(), retrieval=True)
        model = Blip2ForImageTextRetrieval(config)
    else:
        tokenizer = llm_tokenizer(kind)
        vocab = len(tokenizer) + 8  # spare rows, as OPT (50272 > 50265) and Flan-T5 (32128 > 32100) have
        if kind == "opt":
            text = OPTConfig(vocab_size=vocab, hidden_size=24, num_hidden_layers=2, ffn_dim=48, num_attention_heads=2,
                             max_position_embeddings=64, word_embed_proj_dim=24, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, dropout=0.0)
        else:
            text = T5Config(vocab_size=vocab, d_model=24, d_kv=12, d_ff=48, num_layers=2, num_decoder_layers=2,
                            num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                            relative_attention_num_buckets=8, relative_attention_max_distance=16)
        config = blip2_config(text.to_dict(), image_token_index=len(tokenizer))
        model = Blip2ForConditionalGeneration(config)
        if kind == "t5":
            from models.lm_weights import untie_lm_head

            untie_lm_head(model.language_model)
    redraw_(model, seed={"opt": 1, "t5": 2, "itm": 3}[kind])
    model.eval()
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return model, out, tokenizer


def hf_lm_inputs(hf_model, tokenizer, texts: list[str]):
    """input_ids with num_query_tokens image tokens in front (transformers 5 needs them), right-padded."""
    image_id = hf_model.config.image_token_index
    rows = [[image_id] * hf_model.config.num_query_tokens + tokenizer(t).input_ids for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask, [len(r) for r in rows]


def our_generate_ids(model, images: torch.Tensor, prompts: list[str], num_beams: int) -> torch.Tensor:
    soft = model.soft_prompt({"image": images})
    embeds, atts = model.generation_inputs(soft, prompts)
    return model.llm.generate(embeds, atts, num_beams=num_beams, max_new_tokens=8, min_new_tokens=1)


def hf_generate_ids(hf_model, ids, mask, num_beams: int, eos: list[int], pad: int, decoder_only: bool):
    out = hf_model.generate(pixel_values=pixels(), input_ids=ids, attention_mask=mask, num_beams=num_beams,
                            max_new_tokens=8, min_new_tokens=1, do_sample=False, eos_token_id=eos,
                            pad_token_id=pad, top_p=None, top_k=None, temperature=None)
    return out[:, ids.shape[1]:] if decoder_only else out


def pad_to(a: torch.Tensor, b: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(a.shape[1], b.shape[1])
    grow = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad)  # noqa: E731
    return grow(a), grow(b)


# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def opt_case(tmp_path_factory):
    hf, path, tok = build_reference("opt", tmp_path_factory)
    return hf, load_hf_blip2(str(path)), tok, tmp_path_factory


@pytest.fixture(scope="module")
def t5_case(tmp_path_factory):
    hf, path, tok = build_reference("t5", tmp_path_factory)
    return hf, load_hf_blip2(str(path)), tok, tmp_path_factory


@pytest.fixture(scope="module")
def itm_case(tmp_path_factory):
    hf, path, _ = build_reference("itm", tmp_path_factory)
    return hf, load_hf_blip2(str(path)), tmp_path_factory


def opt_logits_match(hf, ours, tok) -> None:
    ids, mask, lengths = hf_lm_inputs(hf, tok, TEXTS)
    with torch.no_grad():
        expected = hf(pixel_values=pixels(), input_ids=ids, attention_mask=mask).logits  # [B, Q+T, V]
        got = ours({"image": pixels(), "text_input": TEXTS}, return_logits=True)["logits"]  # [B, Q+T+1, V] ("\n")
    for row, length in enumerate(lengths):
        torch.testing.assert_close(got[row, :length], expected[row, :length], rtol=0, atol=ATOL)


def opt_generation_match(hf, ours, tok) -> None:
    ids, mask, _ = hf_lm_inputs(hf, tok, ["", ""])  # image tokens + BOS, as our empty prompt
    for beams in (1, 3):
        with torch.no_grad():
            got = our_generate_ids(ours, pixels(), ["", ""], beams)
            expected = hf_generate_ids(hf, ids, mask, beams, ours.llm.eos_token_ids, tok.pad_token_id, True)
        got, expected = pad_to(got, expected, tok.pad_token_id)
        assert torch.equal(got, expected), (beams, got, expected)


def test_opt_logits_and_generation(opt_case):
    hf, ours, tok, _ = opt_case
    assert type(ours).__name__ == "Blip2OPT"
    opt_logits_match(hf, ours, tok)
    opt_generation_match(hf, ours, tok)


def opt_caption_batch(hf, ours, tok) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' inputs for the stage-2 caption loss, empty prompt: input_ids = image tokens + the caption's
    tokens (BOS first) + "\n", labels = the same ids with the image tokens and padding set to -100."""
    image_id, newline = hf.config.image_token_index, ours.llm.newline_token_id
    rows = [[image_id] * NUM_QUERY + tok(t).input_ids + [newline] for t in TEXTS]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask, ids.masked_fill((ids == image_id) | (mask == 0), -100)


def opt_caption_losses(hf, ours, tok) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, transformers) stage-2 caption loss, empty prompt (``opt_caption_batch``)."""
    ids, mask, labels = opt_caption_batch(hf, ours, tok)
    with torch.no_grad():
        expected = hf(pixel_values=pixels(), input_ids=ids, attention_mask=mask, labels=labels).loss
        got = ours({"image": pixels(), "text_input": TEXTS})["loss"]
    return got, expected


def test_opt_caption_loss_equals_transformers_loss_with_labels(opt_case):
    """Stage-2 pre-training loss (no prompt) = Blip2ForConditionalGeneration's loss with labels (1e-5): the first
    text token (BOS) is scored, predicted from the last query. ``mask_bos`` is the documented departure."""
    hf, ours, tok, _ = opt_case
    assert ours.prompt == "" and ours.mask_bos is False
    got, expected = opt_caption_losses(hf, ours, tok)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    ours.mask_bos = True
    try:
        masked, _ = opt_caption_losses(hf, ours, tok)
    finally:
        ours.mask_bos = False
    assert (masked - expected).abs() > 1e-3  # the option really changes the objective


def test_opt_export_reloads_in_transformers(opt_case):
    from transformers import Blip2ForConditionalGeneration

    hf, ours, tok, factory = opt_case
    out = export_to_hf(ours, factory.mktemp("export_opt"))
    reloaded = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    assert reloaded.config.image_token_index == len(tok)  # the first spare row
    opt_logits_match(reloaded, ours, tok)
    opt_generation_match(reloaded, ours, tok)


def t5_inputs(hf, tok, prompts):
    ids, mask, _ = hf_lm_inputs(hf, tok, prompts)
    return ids, mask


def t5_logits_match(hf, ours, tok) -> None:
    prompts, targets = ["question: what color is the circle?", "a photo of"], ["red", "two blue squares"]
    ids, mask = t5_inputs(hf, tok, prompts)
    target = tok(targets, padding="longest", return_tensors="pt")
    labels = target.input_ids.masked_fill(target.attention_mask == 0, -100)
    with torch.no_grad():
        expected = hf(pixel_values=pixels(), input_ids=ids, attention_mask=mask, labels=labels,
                      decoder_attention_mask=target.attention_mask).logits
        got = ours({"image": pixels(), "text_input": prompts, "text_output": targets}, return_logits=True)["logits"]
    valid = target.attention_mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=0, atol=ATOL)


def t5_generation_match(hf, ours, tok) -> None:
    prompts = ["question: how many shapes are there? answer:", "a photo of"]
    ids, mask = t5_inputs(hf, tok, prompts)
    for beams in (1, 3):
        with torch.no_grad():
            got = our_generate_ids(ours, pixels(), prompts, beams)
            expected = hf_generate_ids(hf, ids, mask, beams, ours.llm.eos_token_ids, tok.pad_token_id, False)
        got, expected = pad_to(got, expected, tok.pad_token_id)
        assert torch.equal(got, expected), (beams, got, expected)


def test_t5_logits_and_generation(t5_case):
    hf, ours, tok, _ = t5_case
    assert type(ours).__name__ == "Blip2T5"
    # Untied lm_head survived loading (the Flan-T5 trap): it differs from the shared embedding.
    assert not torch.equal(ours.llm.model.lm_head.weight, ours.llm.model.shared.weight)
    t5_logits_match(hf, ours, tok)
    t5_generation_match(hf, ours, tok)


def test_t5_export_reloads_in_transformers(t5_case):
    from transformers import Blip2ForConditionalGeneration

    hf, ours, tok, factory = t5_case
    out = export_to_hf(ours, factory.mktemp("export_t5"))
    reloaded = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    t5_logits_match(reloaded, ours, tok)
    t5_generation_match(reloaded, ours, tok)


def itm_itc_match(hf, ours) -> None:
    with torch.no_grad():
        image_feats, image_embeds = ours.image_retrieval_features(pixels())  # [B,Q,E], [B,N,W]
        text_feat, ids, atts = ours.text_retrieval_features(TEXTS)  # [B,E], [B,T], [B,T]
        itm = ours.itm_scores(image_embeds, ids, atts)  # [B]
        itc = (image_feats @ text_feat.t()).max(dim=1).values  # [B_img, B_txt]
        hf_itm = hf(pixel_values=pixels(), input_ids=ids, attention_mask=atts,
                    use_image_text_matching_head=True).logits_per_image  # [B, 2]
        hf_itc = hf(pixel_values=pixels(), input_ids=ids, attention_mask=atts,
                    use_image_text_matching_head=False).logits_per_image  # [B_img, B_txt]
    torch.testing.assert_close(itm, hf_itm[:, 1], rtol=0, atol=ATOL)
    torch.testing.assert_close(itc, hf_itc, rtol=0, atol=ATOL)
    assert itm.abs().max() > 1e-3 and itc.std() > 1e-3  # not a degenerate comparison


def test_itm_and_itc_scores(itm_case):
    hf, ours, _ = itm_case
    assert type(ours).__name__ == "Blip2ITM"
    itm_itc_match(hf, ours)


def test_itm_export_reloads_in_transformers(itm_case):
    from transformers import Blip2ForImageTextRetrieval

    hf, ours, factory = itm_case
    out = export_to_hf(ours, factory.mktemp("export_itm"))
    reloaded = Blip2ForImageTextRetrieval.from_pretrained(out).eval()
    itm_itc_match(reloaded, ours)


def test_tiny_zoo_model_exports_with_grown_vocab(tmp_path):
    """The ``tiny`` blip2_opt (plain timm ViT, OPT without spare vocabulary rows) exports too: the ``<image>`` token
    gets a new row that generation suppresses; transformers and a reload into our framework agree with it."""
    from transformers import Blip2ForConditionalGeneration

    from models import load_model

    torch.manual_seed(0)
    ours = load_model("blip2_opt", "tiny", is_eval=True)
    redraw_(ours, seed=4)
    tok = ours.llm.tokenizer
    vocab = ours.llm.model.get_input_embeddings().weight.shape[0]
    assert vocab == len(tok)  # no spare row: the export must grow the vocabulary
    out = export_to_hf(ours, tmp_path / "tiny_opt")
    hf = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    assert hf.config.image_token_index == vocab and hf.generation_config.suppress_tokens == [vocab]
    size = ours.visual_encoder.image_size
    images = pixels(size=size)
    ids, mask, lengths = hf_lm_inputs(hf, tok, TEXTS)
    with torch.no_grad():
        expected = hf(pixel_values=images, input_ids=ids, attention_mask=mask).logits[..., :vocab]
        got = ours({"image": images, "text_input": TEXTS}, return_logits=True)["logits"]
        back = load_hf_blip2(str(out))
        again = back({"image": images, "text_input": TEXTS}, return_logits=True)["logits"]
        gen_ids, gen_mask, _ = hf_lm_inputs(hf, tok, ["", ""])
        ours_gen = our_generate_ids(ours, images, ["", ""], 3)
        hf_gen = hf.generate(pixel_values=images, input_ids=gen_ids, attention_mask=gen_mask, num_beams=3,
                             max_new_tokens=8, min_new_tokens=1, eos_token_id=ours.llm.eos_token_ids,
                             pad_token_id=tok.pad_token_id)[:, gen_ids.shape[1]:]
    for row, length in enumerate(lengths):
        torch.testing.assert_close(got[row, :length], expected[row, :length], rtol=0, atol=ATOL)
        torch.testing.assert_close(again[row, :length, :vocab], got[row, :length], rtol=0, atol=ATOL)
    ours_gen, hf_gen = pad_to(ours_gen, hf_gen, tok.pad_token_id)
    assert torch.equal(ours_gen, hf_gen)
