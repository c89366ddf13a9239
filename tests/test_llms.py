"""Frozen LLM adapters (models/llms.py) and tiny offline assets (models/tiny.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import registry
from models import tiny
from common.precision import resolve_precision
from models.llms import FlanT5LLM, HFCausalLM, HFSeq2SeqLM, OPTLLM
from models.lm_weights import untie_lm_head


@pytest.fixture(scope="module")
def cache():
    """The session's private cache root (tests/conftest.py), where tiny assets are built once."""
    return Path(os.environ["BLIP2_CACHE_ROOT"])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: thread sync costs more than it saves on a shared 2-core box
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def opt(cache):
    return OPTLLM("tiny:opt")


@pytest.fixture(scope="module")
def t5(cache):
    return FlanT5LLM("tiny:t5")


def _soft_prompt_batch(llm, texts, n_query=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = llm.tokenizer(texts, return_tensors="pt", padding="longest")
    queries = torch.randn(len(texts), n_query, llm.hidden_size, generator=g, requires_grad=True)
    embeds = torch.cat([queries, llm.embed_tokens(enc.input_ids)], 1)
    mask = torch.cat([torch.ones(len(texts), n_query, dtype=torch.long), enc.attention_mask], 1)
    return queries, embeds, mask, enc


def test_registry_names():
    for name, cls in [("opt", OPTLLM), ("flan_t5", FlanT5LLM), ("hf_causal_lm", HFCausalLM),
                      ("hf_seq2seq_lm", HFSeq2SeqLM)]:
        assert registry.llms.get(name) is cls


def test_tiny_assets_are_deterministic_and_cached(cache, tmp_path):
    path = tiny.tiny_llm_path("opt")
    assert path.parent.parent == cache and (path / "config.json").exists()
    assert tiny.tiny_llm_path("opt") == path  # cached, not rebuilt
    other = tiny.build_tiny_llm("opt", tmp_path / "again", seed=0)
    from safetensors.torch import load_file

    a, b = load_file(path / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(tiny.build_tiny_llm("opt", tmp_path / "seed1", seed=1) / "model.safetensors")
    assert not torch.equal(a["model.decoder.layers.0.fc1.weight"], c["model.decoder.layers.0.fc1.weight"])
    assert tiny.resolve_asset("facebook/opt-2.7b") == "facebook/opt-2.7b"
    with pytest.raises(ValueError, match="'opt' or 't5'"):
        tiny.resolve_asset("tiny:gpt9")


def test_tiny_tokenizers(opt, t5):
    tok = opt.tokenizer
    ids = tok("a red circle\n").input_ids
    assert ids[0] == tok.bos_token_id == 2 and ids[-1] == opt.newline_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle\n"
    assert opt.eos_token_ids == [opt.newline_token_id, 2]
    t5_ids = t5.tokenizer("a red circle").input_ids
    assert t5_ids[-1] == t5.tokenizer.eos_token_id == 1 and t5.tokenizer.pad_token_id == 0
    assert t5.tokenizer.decode(t5_ids, skip_special_tokens=True) == "a red circle"


def test_frozen_for_real(opt, t5):
    assert opt.model.config._attn_implementation == "sdpa" == t5.model.config._attn_implementation
    assert not any(p.requires_grad for p in opt.parameters())
    parent = torch.nn.Sequential(opt)
    parent.train()
    assert not opt.training and not opt.model.training
    _, embeds, mask, _ = _soft_prompt_batch(opt, ["a red circle", "two cats"])
    # dropout is 0.1 in the tiny config: eval mode makes two forwards identical
    a, b = opt(embeds, mask).logits, opt(embeds, mask).logits
    assert torch.equal(a, b)


def test_causal_forward_loss_and_grad_to_soft_prompt(opt):
    queries, embeds, mask, enc = _soft_prompt_batch(opt, ["a red circle", "two cats on a couch"])
    assert embeds.shape == (2, 3 + enc.input_ids.shape[1], 64) and opt.hidden_size == 64
    labels = torch.cat([torch.full((2, 3), -100), enc.input_ids.masked_fill(enc.attention_mask == 0, -100)], 1)
    out = opt(embeds, mask, labels=labels)
    assert out.logits.shape == (*labels.shape, len(opt.tokenizer))
    # per-sample NLL matches a manual shifted cross-entropy
    logp = out.logits.float().log_softmax(-1)
    for i in range(2):
        pos = (labels[i, 1:] != -100).nonzero().flatten()
        manual = -logp[i, pos, labels[i, 1 + pos]].sum()
        assert torch.allclose(out.nll[i], manual, atol=1e-4)
    assert torch.allclose(out.loss, out.nll.sum() / out.num_tokens.sum())
    out.loss.backward()
    assert queries.grad is not None and queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in opt.parameters())


def test_causal_loss_without_logits_projects_scored_positions_only(opt, monkeypatch):
    """return_logits=False: same loss, NLL and soft-prompt gradient, with the LM head run on scored rows only."""
    queries, embeds, mask, enc = _soft_prompt_batch(opt, ["a red circle", "two cats on a couch"])
    labels = torch.cat([torch.full((2, 3), -100), enc.input_ids.masked_fill(enc.attention_mask == 0, -100)], 1)
    full = opt(embeds, mask, labels=labels)
    (grad_full,) = torch.autograd.grad(full.loss, queries, retain_graph=True)
    head_rows = []
    hook = opt.model.get_output_embeddings().register_forward_hook(lambda m, i, o: head_rows.append(i[0].shape))
    lean = opt(embeds, mask, labels=labels, return_logits=False)
    hook.remove()
    (grad_lean,) = torch.autograd.grad(lean.loss, queries)
    assert lean.logits is None and opt._selects_logit_rows
    assert head_rows == [(int(labels[:, 1:].ne(-100).sum()), opt.hidden_size)]  # flattened scored rows
    assert torch.allclose(lean.loss, full.loss, atol=1e-6) and torch.allclose(lean.nll, full.nll, atol=1e-5)
    assert torch.equal(lean.num_tokens, full.num_tokens)
    assert torch.allclose(grad_lean, grad_full, atol=1e-6)
    # a model that cannot select rows computes every logit and still gives the same loss
    monkeypatch.setitem(opt.__dict__, "_selects_logit_rows", False)
    assert torch.allclose(opt(embeds, mask, labels=labels, return_logits=False).loss, full.loss, atol=1e-6)


def test_causal_generate_shapes(opt):
    _, embeds, mask, _ = _soft_prompt_batch(opt, ["a red", "question: what color is it? answer:"])
    ids = opt.generate(embeds.detach(), mask, num_beams=3, max_new_tokens=6, num_return_sequences=2)
    assert ids.shape[0] == 4 and 1 <= ids.shape[1] <= 6
    greedy = opt.generate(embeds.detach(), mask, num_beams=1, max_new_tokens=6)
    assert greedy.shape[0] == 2 and len(opt.decode(greedy)) == 2
    sampled = opt.generate(embeds.detach(), mask, num_beams=1, do_sample=True, top_p=0.5, max_new_tokens=4)
    assert sampled.shape[0] == 2



def test_causal_generate_runs_the_prompt_once_per_input(opt, monkeypatch):
    """The prompt's KV cache is computed for B rows and repeated per beam / returned sample: same ids as
    transformers' generate, which runs the prompt for every copy; left padding included."""
    _, embeds, mask, _ = _soft_prompt_batch(opt, ["a red", "question: what color is it? answer:"])
    embeds = embeds.detach()
    calls = []
    monkeypatch.setattr(opt, "_shared_prefix_cache", lambda *a: calls.append(a[0].shape) or {})
    plain = [opt.generate(embeds, mask, num_beams=3, max_new_tokens=6, num_return_sequences=2)]
    torch.manual_seed(0)
    plain.append(opt.generate(embeds, mask, num_beams=1, do_sample=True, max_new_tokens=5, num_return_sequences=2))
    monkeypatch.undo()
    shared = [opt.generate(embeds, mask, num_beams=3, max_new_tokens=6, num_return_sequences=2)]
    torch.manual_seed(0)
    shared.append(opt.generate(embeds, mask, num_beams=1, do_sample=True, max_new_tokens=5, num_return_sequences=2))
    assert len(calls) == 2 and all(torch.equal(a, b) for a, b in zip(plain, shared))
    assert opt._shared_prefix_cache(embeds, mask, 3)["cache"].get_seq_length() == embeds.shape[1] - 1


def test_t5_untie_trap(t5, cache):
    model = t5.model
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert not model.config.scale_decoder_outputs  # flan-style untied checkpoint
    # loading an untied state dict keeps both tensors distinct (a tied model would overwrite shared)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = torch.randn_like(sd["lm_head.weight"])
    fresh = FlanT5LLM("tiny:t5", load_weights=False)
    assert fresh.model.lm_head.weight.data_ptr() != fresh.model.shared.weight.data_ptr()
    fresh.load_hf_state_dict(sd)
    assert torch.equal(fresh.model.lm_head.weight, sd["lm_head.weight"])
    assert torch.equal(fresh.model.shared.weight, sd["shared.weight"])
    assert torch.equal(fresh.model.encoder.embed_tokens.weight, sd["shared.weight"])
    # a tied checkpoint without lm_head.weight gets lm_head = shared
    del sd["lm_head.weight"]
    fresh.load_hf_state_dict(sd)
    assert torch.equal(fresh.model.lm_head.weight, sd["shared.weight"])
    # the trap itself, demonstrated on a plain transformers T5 built from the config
    from transformers import T5ForConditionalGeneration

    plain = T5ForConditionalGeneration(type(model.config).from_dict(model.config.to_dict()))
    assert plain.lm_head.weight.data_ptr() == plain.shared.weight.data_ptr()
    untie_lm_head(plain)
    plain.tie_weights()
    assert plain.lm_head.weight.data_ptr() != plain.shared.weight.data_ptr()


def test_seq2seq_forward_and_generate(t5):
    enc = t5.tokenizer(["a red circle", "two cats"], return_tensors="pt", padding="longest")
    queries = torch.randn(2, 3, t5.hidden_size, requires_grad=True)
    embeds = torch.cat([queries, t5.embed_tokens(enc.input_ids)], 1)
    mask = torch.cat([torch.ones(2, 3, dtype=torch.long), enc.attention_mask], 1)
    target = t5.tokenizer(["red", "yes it is"], return_tensors="pt", padding="longest")
    labels = target.input_ids.masked_fill(target.attention_mask == 0, -100)
    out = t5(embeds, mask, labels=labels, decoder_attention_mask=target.attention_mask)
    assert out.logits.shape == (2, labels.shape[1], len(t5.tokenizer))
    assert out.num_tokens.tolist() == target.attention_mask.sum(1).tolist()
    ref = t5.model(inputs_embeds=embeds, attention_mask=mask, labels=labels,
                   decoder_attention_mask=target.attention_mask)
    assert torch.allclose(out.loss, ref.loss, atol=1e-5)
    out.loss.backward()
    assert queries.grad.abs().sum() > 0
    ids = t5.generate(embeds.detach(), mask, num_beams=3, max_new_tokens=5, num_return_sequences=3)
    assert ids.shape[0] == 6 and ids.shape[1] <= 6  # decoder start token + at most 5 new tokens


def test_generic_causal_gpt2_and_seq2seq(opt, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(opt.tokenizer), n_embd=32, n_layer=2, n_head=2,
                                      n_positions=64, bos_token_id=2, eos_token_id=2))
    gpt2.save_pretrained(tmp_path / "gpt2")
    opt.tokenizer.save_pretrained(tmp_path / "gpt2")
    llm = registry.llms.get("hf_causal_lm")(str(tmp_path / "gpt2"))
    assert llm.hidden_size == 32 and not llm.is_encoder_decoder and llm.eos_token_ids == [2]
    _, embeds, mask, enc = _soft_prompt_batch(llm, ["a red circle", "two"])
    labels = torch.cat([torch.full((2, 3), -100), enc.input_ids.masked_fill(enc.attention_mask == 0, -100)], 1)
    out = llm(embeds, mask, labels=labels)
    assert torch.isfinite(out.loss) and out.logits.shape[:2] == labels.shape
    assert llm.generate(embeds.detach(), mask, num_beams=2, max_new_tokens=3).shape[0] == 2
    seq2seq = registry.llms.get("hf_seq2seq_lm")(str(tiny.tiny_llm_path("t5")))
    assert seq2seq.is_encoder_decoder and seq2seq.hidden_size == 64
    assert seq2seq.model.lm_head.weight.data_ptr() != seq2seq.model.shared.weight.data_ptr()


def test_meta_instantiation_from_local_config(tmp_path):
    # a full-size OPT-2.7b config.json, no weights and no tokenizer files
    cfg = dict(model_type="opt", vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
               num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with torch.device("meta"):
        llm = OPTLLM(str(tmp_path))
    assert llm.hidden_size == 2560 and llm.model.lm_head.weight.device.type == "meta"
    assert 2.6e9 < sum(p.numel() for p in llm.parameters()) < 2.7e9
    flan = FlanT5LLM(str(tmp_path), load_weights=False, precision="bf16",
                     config=dict(model_type="t5", vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                 num_heads=4, feed_forward_proj="gated-gelu"))
    assert flan.dtype == torch.bfloat16 and flan.is_encoder_decoder


def test_precision_rules(monkeypatch):
    assert resolve_precision("bf16", "fp16") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto", "fp16") == torch.float32
    assert resolve_precision("fp16", "fp16") == torch.float32  # never fp16 on CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision("auto", "fp16") == torch.float16
    assert resolve_precision(None, "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", "fp16")


def test_fp16_weights_on_cpu_are_upcast(opt):
    llm = OPTLLM("tiny:opt")
    llm.model.half()
    _, embeds, mask, _ = _soft_prompt_batch(llm, ["a red"])
    out = llm(embeds, mask)
    assert llm.dtype == torch.float32 and out.logits.dtype == torch.float32


def test_missing_model_error_names_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        OPTLLM(str(tmp_path / "nowhere"))


def test_bf16_weights_compute_in_bf16(opt):
    llm = OPTLLM("tiny:opt", precision="bf16")
    assert llm.dtype == torch.bfloat16
    queries, embeds, mask, enc = _soft_prompt_batch(llm, ["a red circle", "two"])
    labels = torch.cat([torch.full((2, 3), -100), enc.input_ids.masked_fill(enc.attention_mask == 0, -100)], 1)
    out = llm(embeds.float(), mask, labels=labels)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert queries.grad.dtype == torch.float32 and queries.grad.abs().sum() > 0
    ref = opt(embeds.detach().float(), mask, labels=labels)
    assert abs(float(out.loss.detach()) - float(ref.loss.detach())) < 0.1  # same model, bf16 rounding only
