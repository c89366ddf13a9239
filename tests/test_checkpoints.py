"""Checkpoint sources, file formats and the Hugging Face <-> ours key mapping (no network)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from models import checkpoints as ck
from models.hf_export import export_to_hf


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"query_tokens": torch.randn(1, 4, 8, generator=g), "ln_vision.weight": torch.randn(8, generator=g),
            "Qformer.bert.embeddings.LayerNorm.bias": torch.randn(8, generator=g)}


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def write_two_shards(directory, sd: dict, first: int):
    """An HF-style sharded checkpoint: the ``first`` names (sorted) in shard 1, the rest in shard 2."""
    directory.mkdir()
    keys = sorted(sd)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file({k: sd[k] for k in keys[:first]}, str(directory / names[0]))
    save_file({k: sd[k] for k in keys[first:]}, str(directory / names[1]))
    weight_map = {k: names[0 if i < first else 1] for i, k in enumerate(keys)}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def test_read_lavis_pth_our_safetensors_and_plain_files(tmp_path):
    sd = small_state()
    torch.save({"model": sd, "epoch": 3, "config": {"run": {"lr": 1e-4}}}, tmp_path / "lavis.pth")
    save_file(sd, str(tmp_path / "ours.safetensors"))
    torch.save(sd, tmp_path / "plain.bin")
    for name in ("lavis.pth", "ours.safetensors", "plain.bin"):
        assert_same(ck.read_state_dict(tmp_path / name), sd)
        assert ck.detect_format(ck.read_state_dict(str(tmp_path / name))) == "ours"


def test_read_hf_directories_single_sharded_and_bin(tmp_path):
    sd = {"qformer.layernorm.weight": torch.ones(4), "query_tokens": torch.zeros(1, 2, 4),
          "vision_model.post_layernorm.bias": torch.zeros(4)}
    single = tmp_path / "single"
    single.mkdir()
    save_file(sd, str(single / "model.safetensors"))
    assert_same(ck.read_state_dict(single), sd)

    sharded = write_two_shards(tmp_path / "sharded", sd, first=1)
    assert_same(ck.read_state_dict(sharded), sd)

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(sd, legacy / "pytorch_model.bin")
    assert_same(ck.read_state_dict(legacy), sd)
    assert ck.detect_format(sd) == "hf"

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no weights in directory"):
        ck.read_state_dict(empty)


def test_unsafe_pickles_and_non_state_dicts_are_refused(tmp_path):
    import argparse

    # An arbitrary object (old LAVIS-era checkpoints sometimes pickled argparse namespaces): refused.
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=1)}, tmp_path / "unsafe.pth")
    with pytest.raises(ValueError, match="weights_only"):
        ck.read_state_dict(tmp_path / "unsafe.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="state dict"):
        ck.read_state_dict(tmp_path / "list.pth")


def test_url_cache_and_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/blip2_test.pth"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        ck.read_state_dict(url)

    calls = []

    def fake_download(src, dst, progress=True):  # stands in for the network
        calls.append(src)
        torch.save({"model": small_state()}, dst)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert_same(ck.read_state_dict(url), small_state())
    assert_same(ck.read_state_dict(url), small_state())  # second time from the cache
    assert calls == [url]
    assert (tmp_path / "torch" / "hub" / "checkpoints" / "blip2_test.pth").exists()


def test_hub_id_offline_and_bad_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="Salesforce/blip2-opt-2.7b"):
        ck.resolve_source("Salesforce/blip2-opt-2.7b")
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        ck.resolve_source(str(tmp_path / "missing" / "ckpt.pth"))
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        ck.resolve_source("output/ckpt.pth")  # a relative path, not a hub id


def test_hub_id_uses_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    snap = tmp_path / "snap"
    snap.mkdir()
    save_file(small_state(), str(snap / "model.safetensors"))
    seen = {}

    def fake_snapshot(repo_id, revision=None, allow_patterns=None):
        seen.update(repo_id=repo_id, revision=revision)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert_same(ck.read_state_dict("Salesforce/blip2-itm-vit-g@main"), small_state())
    assert seen == {"repo_id": "Salesforce/blip2-itm-vit-g", "revision": "main"}


# ------------------------------------------------------------------------------------------------------------------
# Key mapping against real transformers models (keys and shapes only; numerics are in test_hf_parity.py)
# ------------------------------------------------------------------------------------------------------------------
def tiny_hf_config(text: str):
    from transformers import Blip2Config, OPTConfig, T5Config

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=14, layer_norm_eps=1e-6)
    qformer = dict(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                   encoder_hidden_size=32, cross_attention_frequency=2, max_position_embeddings=64,
                   use_qformer_text_input=text == "itm")
    if text == "t5":
        text_cfg = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                            num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False).to_dict()
    else:
        text_cfg = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                             max_position_embeddings=64, word_embed_proj_dim=16).to_dict()
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text_cfg, num_query_tokens=4,
                       image_text_hidden_size=8)


@pytest.mark.parametrize("kind", ["opt", "t5", "itm"])
def test_hf_keys_round_trip(kind):
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    cls = Blip2ForImageTextRetrieval if kind == "itm" else Blip2ForConditionalGeneration
    hf_sd = cls(tiny_hf_config(kind)).state_dict()
    layout = ck.model_layout(None, "t5" if kind == "t5" else "opt")
    if kind == "itm":
        layout["llm"] = layout["proj"] = None
    ours = ck.hf_to_ours(hf_sd, layout)
    assert "ln_vision.weight" in ours and "query_tokens" in ours
    assert "visual_encoder.blocks.1.attn.q_bias" in ours and "visual_encoder.blocks.1.attn.v_bias" in ours
    assert "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in ours
    assert "Qformer.bert.embeddings.LayerNorm.weight" in ours
    if kind == "itm":
        assert {"vision_proj.weight", "text_proj.weight", "itm_head.weight",
                "Qformer.bert.embeddings.word_embeddings.weight", "Qformer.bert.encoder.layer.1.output.dense.weight"} <= set(ours)
    else:
        prefix = "t5_model.model." if kind == "t5" else "opt_model.model."
        assert f"{'t5' if kind == 't5' else 'opt'}_proj.weight" in ours
        assert any(k.startswith(prefix) for k in ours)
    back = ck.ours_to_hf(ours, layout)
    # Everything comes back, except the key bias slice (EVA has none; re-created as zeros).
    assert sorted(back) == sorted(k for k in hf_sd if not k.endswith("position_ids"))
    for key, value in back.items():
        if key.endswith("self_attn.qkv.bias"):
            torch.testing.assert_close(value[:32], hf_sd[key][:32])
            assert torch.equal(value[32:64], torch.zeros(32))
        else:
            torch.testing.assert_close(value, hf_sd[key], msg=key)


def test_unknown_hf_key_and_stage1_keys_for_stage2_model():
    with pytest.raises(KeyError, match="unknown Hugging Face BLIP-2 key"):
        ck.hf_to_ours({"qformer.layernorm.weight": torch.ones(2), "qformer.bogus": torch.ones(1)},
                      ck.model_layout(None))

    class Stage2Like(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query_tokens = torch.nn.Parameter(torch.zeros(1, 4, 8))

    stage1 = {"query_tokens": torch.ones(1, 4, 8), "temp": torch.tensor(0.07), "itm_head.weight": torch.ones(2, 8),
              "Qformer.cls.predictions.bias": torch.zeros(5),
              "Qformer.bert.encoder.layer.0.intermediate.dense.weight": torch.ones(3, 8),
              "Qformer.bert.encoder.layer.0.output_query.dense.weight": torch.ones(8, 3)}
    loaded = ck.load_state_dict_any(stage1, model=Stage2Like())
    # Stage-1-only parts are dropped; a real mismatch (output_query) is kept for the model to report.
    assert sorted(loaded) == ["Qformer.bert.encoder.layer.0.output_query.dense.weight", "query_tokens"]
    assert sorted(ck.load_state_dict_any(stage1)) == sorted(stage1)  # without a model nothing is dropped


def test_lavis_checkpoint_with_trained_clip_vit_gets_timm_names():
    """A LAVIS checkpoint whose (fine-tuned) CLIP ViT-L is stored under OpenAI names loads with our timm names."""
    sd = {"visual_encoder.conv1.weight": torch.randn(8, 3, 14, 14), "visual_encoder.class_embedding": torch.randn(8),
          "visual_encoder.positional_embedding": torch.randn(5, 8),
          "visual_encoder.transformer.resblocks.0.attn.in_proj_weight": torch.randn(24, 8),
          "query_tokens": torch.zeros(1, 2, 4)}
    out = ck.load_state_dict_any(sd)
    assert sorted(out) == ["query_tokens", "visual_encoder.blocks.0.attn.qkv.weight", "visual_encoder.cls_token",
                           "visual_encoder.patch_embed.proj.weight", "visual_encoder.pos_embed"]
    assert out["visual_encoder.cls_token"].shape == (1, 1, 8) and out["visual_encoder.pos_embed"].shape == (1, 5, 8)


def test_select_reads_a_subset_and_legacy_pickles_load(tmp_path):
    sd = {"vision_model.embeddings.class_embedding": torch.ones(1, 1, 4), "language_model.lm_head.weight": torch.ones(3, 4),
          "qformer.layernorm.weight": torch.ones(4)}
    save_file(sd, str(tmp_path / "model.safetensors"))
    torch.save(sd, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    for path in (tmp_path / "model.safetensors", tmp_path / "legacy.bin"):
        assert sorted(ck.read_state_dict(path, select=ck.is_vision_key)) == ["vision_model.embeddings.class_embedding"]
        assert sorted(ck.read_state_dict(path)) == sorted(sd)


def test_pieces_match_the_whole_read(tmp_path):
    """Read a piece at a time, the format is still decided from every name: a piece holding only
    ``visual_encoder.positional_embedding`` of a LAVIS CLIP model is renamed like the rest."""
    clip = {"visual_encoder.conv1.weight": torch.randn(8, 3, 14, 14), "visual_encoder.class_embedding": torch.randn(8),
            "visual_encoder.positional_embedding": torch.randn(5, 8), "query_tokens": torch.zeros(1, 2, 4)}
    torch.save({"model": clip}, tmp_path / "lavis_clip.pth")
    hf = {"qformer.layernorm.weight": torch.ones(4), "query_tokens": torch.zeros(1, 2, 4),
          "vision_model.encoder.layers.0.self_attn.qkv.bias": torch.arange(12.0),
          "vision_model.post_layernorm.bias": torch.zeros(4)}
    sharded = write_two_shards(tmp_path / "sharded", hf, first=2)
    expected = {tmp_path / "lavis_clip.pth": "visual_encoder.pos_embed", sharded: "visual_encoder.blocks.0.attn.q_bias"}
    for source, renamed in expected.items():
        pieces = list(ck.iter_state_dict_any(source, piece_size=1))
        assert len(pieces) == 4
        merged = {k: v for piece in pieces for k, v in piece.items()}
        assert_same(merged, ck.load_state_dict_any(source))
        assert renamed in merged


def test_load_checkpoint_in_pieces_loads_everything_and_names_what_is_missing(tmp_path, monkeypatch):
    import registry
    from models import load_hf_blip2
    from models.base_model import BaseModel
    from safetensors.torch import load_file

    torch.manual_seed(0)
    out = export_to_hf(registry.models.get("blip2_opt").from_pretrained("tiny"), tmp_path / "hf",
                          save_processor=False)
    monkeypatch.setattr(BaseModel, "checkpoint_piece_size", 5)
    model = load_hf_blip2(str(out))
    whole = ck.load_state_dict_any(out, model=model)
    state = model.state_dict()
    assert len(whole) > 50
    for name, value in whole.items():
        torch.testing.assert_close(state[name], value, msg=name, rtol=0, atol=0)

    weights = load_file(str(out / "model.safetensors"))
    dropped = next(k for k in sorted(weights) if k.startswith("qformer.encoder.layer.0."))
    save_file({k: v for k, v in weights.items() if k != dropped}, str(out / "model.safetensors"))
    with pytest.raises(KeyError, match=r"1 missing keys \['Qformer\.bert\.encoder\.layer\.0\."):
        model.load_checkpoint(str(out))


@pytest.mark.parametrize("arch", ["blip2_opt", "blip2_t5"])
def test_hf_checkpoint_llm_is_built_on_meta_and_takes_its_weights(tmp_path, arch):
    """From a Hugging Face BLIP-2 checkpoint the LLM is not randomly initialised: it is built on the meta device and
    takes the checkpoint's tensors, cast to its precision, with tied embeddings tied again; a checkpoint lacking some
    LLM tensor is refused by name."""
    import registry
    from models import load_hf_blip2
    from safetensors.torch import load_file

    torch.manual_seed(0)
    source = registry.models.get(arch).from_pretrained("tiny")
    out = export_to_hf(source, tmp_path / "hf", save_processor=False)
    model = load_hf_blip2(str(out), llm_precision="bf16")
    llm = model.llm.model
    assert not any(t.is_meta for t in [*llm.parameters(), *llm.buffers()])
    assert {p.dtype for p in llm.parameters()} == {torch.bfloat16}

    def tied_groups(module):
        by_id: dict[int, list[str]] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(param), []).append(name)
        return sorted(sorted(names) for names in by_id.values() if len(names) > 1)

    assert tied_groups(llm) == tied_groups(source.llm.model) != []
    state = model.state_dict()
    for name, value in ck.load_state_dict_any(out, model=model).items():
        torch.testing.assert_close(state[name], value.to(state[name].dtype), msg=name, rtol=0, atol=0)

    weights = load_file(str(out / "model.safetensors"))
    first_layer = ("layers.0.", "block.0.")  # OPT decoder / T5 stack
    dropped = next(k for k in sorted(weights) if k.startswith("language_model.") and any(s in k for s in first_layer))
    save_file({k: v for k, v in weights.items() if k != dropped}, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="holds no weights for 1 LLM tensors"):
        load_hf_blip2(str(out))
