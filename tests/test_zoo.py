"""Model zoo: listing, tiny types offline, processors, checkpoints on top, meta-device skeletons of every type."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from models import build_model_skeleton, load_model, load_model_and_preprocess, load_preprocess, model_zoo
from common.precision import cpu_safe_
from models.zoo import model_config_from_hf

ISSUE_TYPES = {
    "blip2": {"pretrain", "pretrain_vitL", "coco", "tiny"},
    "blip2_feature_extractor": {"pretrain", "pretrain_vitL", "coco", "tiny"},
    "blip2_image_text_matching": {"pretrain", "pretrain_vitL", "coco", "tiny"},
    "blip2_opt": {"pretrain_opt2.7b", "pretrain_opt6.7b", "caption_coco_opt2.7b", "caption_coco_opt6.7b", "tiny"},
    "blip2_t5": {"pretrain_flant5xl", "pretrain_flant5xl_vitL", "pretrain_flant5xxl", "caption_coco_flant5xl", "tiny"},
}


def test_model_zoo_lists_every_type():
    text = str(model_zoo)
    lines = text.splitlines()
    assert lines[0] == "=" * 50 and lines[1].startswith("Architectures") and lines[1].endswith("Types")
    listed = dict(model_zoo)
    for arch, types in ISSUE_TYPES.items():
        assert types <= set(listed[arch]), arch
        assert any(line.startswith(f"{arch:<30} ") for line in lines)
    assert len(model_zoo) == sum(len(t) for t in listed.values()) >= 22


def test_importing_models_stays_light():
    code = ("import sys, models; heavy = [m for m in ('decord', 'webdataset', 'pycocoevalcap', 'spacy', 'datasets.builders')"
            " if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("arch", sorted(ISSUE_TYPES))
def test_tiny_type_offline_with_processors(arch, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, vis, txt = load_model_and_preprocess(arch, "tiny", is_eval=True)
    assert not model.training
    assert type(vis["eval"]).__name__ == "BlipImageEvalProcessor" and "train" in vis and "eval" in txt
    image = vis["eval"](Image.new("RGB", (50, 40), (200, 30, 30))).unsqueeze(0)  # [1, 3, S, S]
    counts = model.parameter_counts()
    assert 0 < counts["trainable"] < counts["total"]
    with torch.no_grad():
        if arch in ("blip2_opt", "blip2_t5"):
            captions = model.generate({"image": image}, num_beams=1, max_length=3)
            assert len(captions) == 1 and isinstance(captions[0], str)
        else:
            feats = model.extract_features({"image": image, "text_input": [txt["eval"]("A red circle!")]},
                                           mode="image")
            embeds = feats.image_embeds if hasattr(feats, "image_embeds") else feats["image_embeds"]
            assert embeds.shape[0] == 1 and torch.isfinite(embeds).all()


def test_load_model_with_checkpoint_and_overrides(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = load_model("blip2_opt", "tiny")
    trained = {k: v + 0.5 if v.is_floating_point() else v for k, v in source.trainable_state_dict().items()}
    save_file({k: v.contiguous() for k, v in trained.items()}, str(tmp_path / "ours.safetensors"))
    loaded = load_model("blip2_opt", "tiny", is_eval=True, checkpoint=str(tmp_path / "ours.safetensors"),
                        prompt="a photo of")
    state = loaded.state_dict()
    for key, value in trained.items():
        torch.testing.assert_close(state[key], value, msg=key)
    assert loaded.prompt == "a photo of" and not loaded.training


def test_weights_switch_selects_lavis_checkpoint(tmp_path):
    """``weights: lavis`` loads the original-format ``{"model": sd}`` .pth named by ``pretrained`` (here a local
    file standing in for the LAVIS URL); ``weights: none`` loads nothing."""
    torch.manual_seed(1)
    source = load_model("blip2", "tiny")
    lavis = {k: v + 0.25 if v.is_floating_point() else v for k, v in source.trainable_state_dict().items()}
    torch.save({"model": lavis, "epoch": 9}, tmp_path / "blip2_pretrained.pth")
    loaded = load_model("blip2", "tiny", weights="lavis", load_pretrained=True,
                        pretrained=str(tmp_path / "blip2_pretrained.pth"))
    state = loaded.state_dict()
    for key, value in lavis.items():
        torch.testing.assert_close(state[key], value, msg=key)
    fresh = load_model("blip2", "tiny", weights="none")
    assert not torch.equal(fresh.query_tokens, lavis["query_tokens"])


def test_cpu_safe_upcasts_only_fp16():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2).half(), torch.nn.Linear(2, 2).to(torch.bfloat16),
                                 torch.nn.BatchNorm1d(2).half())
    cpu_safe_(module)
    assert module[0].weight.dtype == torch.float32 and module[2].running_mean.dtype == torch.float32
    assert module[1].weight.dtype == torch.bfloat16


def test_load_preprocess_defaults_and_names():
    vis, txt = load_preprocess(None)
    assert vis["train"]("x") == "x" and txt["eval"]("y") == "y"  # identity where nothing is configured
    vis, txt = load_preprocess({"vis_processor": {"eval": {"name": "blip_image_eval", "image_size": 32}},
                                "text_processor": {"train": {"name": "blip_caption", "prompt": "a photo of "}}})
    assert vis["eval"](Image.new("RGB", (10, 10))).shape == (3, 32, 32)
    assert txt["train"]("A Dog!") == "a photo of a dog"
    with pytest.raises(Exception, match="no_such_processor"):
        load_preprocess({"vis_processor": {"eval": {"name": "no_such_processor"}}})


def test_model_config_from_hf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        model_config_from_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="blip-2"):
        model_config_from_hf(str(tmp_path))


@pytest.fixture(scope="module")
def llm_configs(tmp_path_factory):
    """config.json of OPT-2.7B / 6.7B and Flan-T5-XL / XXL (published sizes), as a local dir would hold them."""
    from transformers import OPTConfig, T5Config

    root = tmp_path_factory.mktemp("llm_configs")
    configs = {
        "opt2.7b": OPTConfig(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                             vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2560),
        "opt6.7b": OPTConfig(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32,
                             vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=4096),
        "flant5xl": T5Config(d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24, num_decoder_layers=24,
                             vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        "flant5xxl": T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, num_decoder_layers=24,
                              vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    }
    for name, config in configs.items():
        config.save_pretrained(root / name)
    return root


# (arch, type, LLM config dir or None, total and trainable parameters in millions, as measured; the paper reports
# 3.8B / 7.8B / 12.1B total for ViT-g + OPT-2.7B / OPT-6.7B / FlanT5-XXL and a 188M-parameter Q-Former)
FULL_SIZE = [
    ("blip2", "pretrain", None, 1172.6, 186.7),
    ("blip2", "pretrain_vitL", None, 448.5, 183.2),  # CLIP ViT-L with 21 blocks
    ("blip2", "coco", None, 1173.2, 1173.2),  # the ViT is fine-tuned (freeze_vit: False)
    ("blip2_opt", "pretrain_opt2.7b", "opt2.7b", 3744.6, 107.1),
    ("blip2_opt", "pretrain_opt6.7b", "opt6.7b", 7752.7, 108.3),
    ("blip2_opt", "caption_coco_opt2.7b", "opt2.7b", 3745.2, 1093.6),
    ("blip2_opt", "caption_coco_opt6.7b", "opt6.7b", 7753.3, 1094.8),
    ("blip2_t5", "pretrain_flant5xl", "flant5xl", 3942.4, 106.7),
    ("blip2_t5", "pretrain_flant5xl_vitL", "flant5xl", 3218.3, 103.2),
    ("blip2_t5", "pretrain_flant5xxl", "flant5xxl", 12229.5, 108.3),
    ("blip2_t5", "caption_coco_flant5xl", "flant5xl", 3943.0, 1093.2),
]


@pytest.mark.slow
@pytest.mark.parametrize("arch,model_type,llm,total,trainable", FULL_SIZE)
def test_full_size_types_on_meta_without_downloads(arch, model_type, llm, total, trainable, llm_configs, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a download was attempted")

    import huggingface_hub

    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", forbidden)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides = {}
    if llm:
        overrides["opt_model" if arch == "blip2_opt" else "t5_model"] = str(llm_configs / llm)
    model = build_model_skeleton(arch, model_type, **overrides)
    assert model.device.type == "meta"
    counts = model.parameter_counts()
    assert counts["total"] / 1e6 == pytest.approx(total, rel=2e-3), counts
    assert counts["trainable"] / 1e6 == pytest.approx(trainable, rel=2e-3), counts
    assert "trainable" in model.parameter_report()
