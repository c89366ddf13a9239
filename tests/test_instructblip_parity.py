"""InstructBLIP parity with Hugging Face ``transformers`` (no hub: tiny random models built here).

References: ``InstructBlipForConditionalGeneration`` with a Llama-style causal LM and with a Flan-T5-style
(gated-gelu, untied) seq2seq LM, and ``InstructBlipVideoForConditionalGeneration`` (Llama) on 4-frame clips; every
weight re-drawn from a seeded normal and saved with ``save_pretrained`` (tokenizers trained locally, the Q-Former's
BERT tokenizer under ``qformer_tokenizer/`` as ``InstructBlipProcessor`` saves it). Our models load those
directories (``load_hf_blip2``) and must give the same logits and loss (1e-4, fp32) and the same greedy and beam
(num_beams=3) token ids. Inputs on the HF side are built here from the tokenizers (the released layout: image
tokens, instruction, target + eos), not from our code. Then each model is exported (``export_to_hf``) and reloaded.
"""
from __future__ import annotations

import pytest
import torch

from models import load_hf_blip2
from models.hf_export import export_to_hf
from tests.test_hf_parity import pad_to, redraw_

pytestmark = pytest.mark.slow  # three reference models, save/load/export: ~1 min on 2 cores

Q = 4  # query tokens
FRAMES = 4
ATOL = 1e-4
INSTRUCTIONS = ["what color is the circle?", "how many shapes are there?"]
TARGETS = ["red", "two blue squares"]
PROMPTS = ["a photo of", "the shape is"]  # same token count in both tokenizers (generation without padding)


def pixels(video: bool = False) -> torch.Tensor:
    shape = (2, FRAMES, 3, 28, 28) if video else (2, 3, 28, 28)  # HF layout: [B, T, 3, H, W]
    return torch.randn(*shape, generator=torch.Generator().manual_seed(7))


def ours_pixels(video: bool = False) -> torch.Tensor:
    return pixels(True).transpose(1, 2) if video else pixels()  # ours: [B, 3, T, H, W]


def build_reference(kind: str, factory):
    """(HF model in eval mode, its directory, LLM tokenizer, Q-Former tokenizer) for kind llama | t5 | video."""
    from transformers import (InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipVideoConfig,
                              InstructBlipVideoForConditionalGeneration, LlamaConfig, T5Config)

    from models.qformer_init import init_tokenizer
    from models.tiny import build_tokenizer

    out = factory.mktemp(f"hf_instruct_{kind}")
    tok = build_tokenizer("t5" if kind == "t5" else "opt")
    vocab = len(tok) + 8  # spare rows; the first is the image/video token
    if kind == "t5":
        text = T5Config(vocab_size=vocab, d_model=24, d_kv=12, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=2,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0, pad_token_id=0,
                        eos_token_id=1, decoder_start_token_id=0, relative_attention_num_buckets=8,
                        relative_attention_max_distance=16)
    else:
        text = LlamaConfig(vocab_size=vocab, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           tie_word_embeddings=False)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)
    qformer = dict(vocab_size=30523, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                   encoder_hidden_size=32, cross_attention_frequency=2, max_position_embeddings=64,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    common = dict(vision_config=vision, qformer_config=qformer, text_config=text.to_dict(), num_query_tokens=Q)
    if kind == "video":
        model = InstructBlipVideoForConditionalGeneration(InstructBlipVideoConfig(**common, video_token_index=len(tok)))
    else:
        model = InstructBlipForConditionalGeneration(InstructBlipConfig(**common, image_token_index=len(tok)))
    if kind == "t5":
        from models.lm_weights import untie_lm_head

        untie_lm_head(model.language_model)
    redraw_(model, seed={"llama": 11, "t5": 12, "video": 13}[kind])
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    qformer_tok = init_tokenizer("bert-base-uncased", truncation_side="left")
    qformer_tok.save_pretrained(out / "qformer_tokenizer")
    return model, out, tok, qformer_tok


@pytest.fixture(scope="module", params=["llama", "t5", "video"])
def case(request, tmp_path_factory):
    hf, path, tok, qtok = build_reference(request.param, tmp_path_factory)
    return request.param, hf, load_hf_blip2(str(path)), tok, qtok, tmp_path_factory


def media_tokens(hf) -> list[int]:
    video = hasattr(hf.config, "video_token_index")
    index = hf.config.video_token_index if video else hf.config.image_token_index
    return [index] * (Q * (FRAMES if video else 1))


def decoder_only_batch(hf, tok, qtok):
    """HF inputs of the released layout: [media tokens | instruction (BOS first) | target + eos | pad]; labels on
    the target only."""
    rows, labels = [], []
    for instruction, target in zip(INSTRUCTIONS, TARGETS):
        prompt = tok(instruction).input_ids
        answer = tok(target, add_special_tokens=False).input_ids + [tok.eos_token_id]
        rows.append(media_tokens(hf) + prompt + answer)
        labels.append([-100] * (len(rows[-1]) - len(answer)) + answer)
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    q = qtok(INSTRUCTIONS, padding="longest", return_tensors="pt")
    return ids, mask, labels, q, [len(r) for r in rows]


def logits_and_loss_match(kind, hf, ours, tok, qtok) -> None:
    video = kind == "video"
    samples = {"image": ours_pixels(video), "text_input": INSTRUCTIONS, "text_output": TARGETS}
    with torch.no_grad():
        got = ours(samples, return_logits=True)
        if kind == "t5":
            enc = tok(INSTRUCTIONS, padding="longest", return_tensors="pt")
            ids = torch.cat([torch.tensor([media_tokens(hf)] * 2), enc.input_ids], 1)
            mask = torch.cat([torch.ones(2, Q, dtype=torch.long), enc.attention_mask], 1)
            target = tok(TARGETS, padding="longest", return_tensors="pt")
            labels = target.input_ids.masked_fill(target.attention_mask == 0, -100)
            q = qtok(INSTRUCTIONS, padding="longest", return_tensors="pt")
            expected = hf(pixel_values=pixels(), qformer_input_ids=q.input_ids, qformer_attention_mask=q.attention_mask,
                          input_ids=ids, attention_mask=mask, labels=labels,
                          decoder_attention_mask=target.attention_mask)
            valid = target.attention_mask.bool()
            torch.testing.assert_close(got["logits"][valid], expected.logits[valid], rtol=0, atol=ATOL)
        else:
            ids, mask, labels, q, lengths = decoder_only_batch(hf, tok, qtok)
            expected = hf(pixel_values=pixels(video), qformer_input_ids=q.input_ids,
                          qformer_attention_mask=q.attention_mask, input_ids=ids, attention_mask=mask, labels=labels)
            for row, length in enumerate(lengths):
                torch.testing.assert_close(got["logits"][row, :length], expected.logits[row, :length], rtol=0,
                                           atol=ATOL)
    torch.testing.assert_close(got["loss"], expected.loss, rtol=0, atol=ATOL)
    assert expected.logits.std() > 1e-2  # not a degenerate comparison


def generation_match(kind, hf, ours, tok, qtok) -> None:
    video = kind == "video"
    decoder_only = kind != "t5"
    lengths = {len(tok(p).input_ids) for p in PROMPTS}
    assert len(lengths) == 1, "prompts must tokenize to one length (no padding on either side)"
    ids = torch.tensor([media_tokens(hf) + tok(p).input_ids for p in PROMPTS])
    q = qtok(PROMPTS, padding="longest", return_tensors="pt")
    eos = ours.llm.eos_token_ids
    for beams in (1, 3):
        with torch.no_grad():
            soft = ours.soft_prompt({"image": ours_pixels(video)}, PROMPTS)
            embeds, atts = ours.generation_inputs(soft, PROMPTS)
            got = ours.llm.generate(embeds, atts, num_beams=beams, max_new_tokens=8, min_new_tokens=1)
            expected = hf.generate(pixel_values=pixels(video), qformer_input_ids=q.input_ids,
                                   qformer_attention_mask=q.attention_mask, input_ids=ids,
                                   attention_mask=torch.ones_like(ids), num_beams=beams, max_new_tokens=8,
                                   min_new_tokens=1, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                                   top_p=None, top_k=None, temperature=None)
        if decoder_only:
            expected = expected[:, ids.shape[1]:]
        got, expected = pad_to(got, expected, tok.pad_token_id)
        assert torch.equal(got, expected), (kind, beams, got, expected)
        if beams == 1:  # the public generate (repetition penalty off, as HF's default) decodes the same ids
            texts = ours.generate({"image": ours_pixels(video), "prompt": PROMPTS}, num_beams=1, max_length=8,
                                  repetition_penalty=1.0)
            assert texts == [t.strip() for t in tok.batch_decode(expected, skip_special_tokens=True)]


def test_parity_with_transformers(case):
    kind, hf, ours, tok, qtok, _ = case
    expected_cls = {"llama": "Blip2VicunaInstruct", "t5": "Blip2T5Instruct", "video": "Blip2VicunaInstruct"}[kind]
    assert type(ours).__name__ == expected_cls and type(ours.Qformer).__name__ == "InstructQFormer"
    logits_and_loss_match(kind, hf, ours, tok, qtok)
    generation_match(kind, hf, ours, tok, qtok)


def test_export_reloads_in_transformers(case):
    from transformers import InstructBlipForConditionalGeneration, InstructBlipVideoForConditionalGeneration

    kind, _, ours, tok, qtok, factory = case
    video = kind == "video"
    out = export_to_hf(ours, factory.mktemp(f"export_{kind}"), video=video)
    cls = InstructBlipVideoForConditionalGeneration if video else InstructBlipForConditionalGeneration
    reloaded = cls.from_pretrained(out).eval()
    assert (out / "qformer_tokenizer").is_dir()
    logits_and_loss_match(kind, reloaded, ours, tok, qtok)
    again = load_hf_blip2(str(out))
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0, msg=key)
