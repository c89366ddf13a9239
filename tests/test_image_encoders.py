"""Image encoders: shapes, position-embedding interpolation, freezing, precision and weight layouts.

Everything runs on tiny random-weight encoders (width 32, 2-3 blocks, 28-56 px images, patch 14).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import registry
from models.checkpoints import timm_vision_to_hf
from models.image_encoders import ClipViTL, EvaViTG, GenericTimmEncoder

TINY = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0)


def tiny_eva(**kw) -> EvaViTG:
    torch.manual_seed(0)
    return EvaViTG(**{"image_size": 28, **TINY, **kw})


def tiny_clip(**kw) -> ClipViTL:
    torch.manual_seed(0)
    return ClipViTL(**{"image_size": 28, **TINY, **kw})


def images(size: int = 28, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def randomize_(module: nn.Module, seed: int = 0) -> None:
    """Re-draw every parameter (LayerNorms included) so that layout mistakes cannot hide behind ones/zeros."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_registered_names():
    assert registry.image_encoders.get("eva_vit_g") is EvaViTG
    assert registry.image_encoders.get("eva_clip_g") is EvaViTG  # LAVIS spelling
    assert registry.image_encoders.get("clip_vit_l") is ClipViTL
    assert registry.image_encoders.get("clip_L") is ClipViTL
    assert registry.image_encoders.get("timm") is GenericTimmEncoder


@pytest.mark.parametrize("builder", [tiny_eva, tiny_clip])
@pytest.mark.parametrize("size", [28, 42])
def test_token_shapes(builder, size):
    enc = builder(image_size=size)
    out = enc(images(size))
    assert out.shape == (2, 1 + (size // 14) ** 2, 32)
    assert enc.num_features == 32 and enc.num_layers == 2
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_full_size_architectures_on_meta():
    """The real EVA ViT-g (39 blocks) and CLIP ViT-L (21 blocks, as LAVIS builds it) build on meta with the
    published sizes."""
    with torch.device("meta"):
        eva = EvaViTG(image_size=224)
        clip = ClipViTL(image_size=224)
    assert eva.num_features == 1408 and len(eva.blocks) == 39
    assert eva.blocks[0].mlp.fc1.out_features == 6144 and eva.blocks[0].attn.num_heads == 16
    assert eva.pos_embed.shape == (1, 257, 1408)
    assert not any("k_bias" in k for k in eva.state_dict())  # q/v bias only
    assert sum(p.numel() for p in eva.parameters()) == pytest.approx(985.9e6, rel=2e-3)
    assert clip.num_features == 1024 and len(clip.blocks) == 21
    # LAVIS's VisionTransformer(layers=22): conv1 + class + positional (257) + ln_pre + 21 resblocks of 12,596,224
    assert sum(p.numel() for p in clip.parameters()) == 3 * 14 * 14 * 1024 + 1024 + 257 * 1024 + 2048 + 21 * 12_596_224
    assert clip.patch_embed.proj.bias is None and isinstance(clip.norm_pre, nn.LayerNorm)
    assert type(clip.blocks[0].mlp.act).__name__ == "QuickGELU"
    with torch.device("meta"):
        eva364 = EvaViTG(image_size=364)
    assert eva364.pos_embed.shape == (1, 677, 1408)
    # No final norm in either (ln_vision belongs to the BLIP-2 model).
    assert not any(k.startswith("norm.") for k in list(eva.state_dict()) + list(clip.state_dict()))


def test_generic_timm_vit_and_cnn():
    torch.manual_seed(0)
    vit = GenericTimmEncoder(model_name="vit_base_patch16_224", image_size=32, embed_dim=24, depth=1, num_heads=2)
    assert vit.is_vit and vit(images(32)).shape == (2, 1 + 4, 24)
    cnn = GenericTimmEncoder(model_name="resnet10t", image_size=64)
    out = cnn(images(64))
    assert not cnn.is_vit and out.shape == (2, 2 * 2, cnn.num_features)
    with pytest.raises(ValueError, match="model_name"):
        GenericTimmEncoder()


def _published_convnext(directory):
    """A tiny random ConvNeXt saved the way timm publishes weights (config.json with model_args +
    model.safetensors); returns (the network, its constructor kwargs)."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    kwargs = dict(depths=[1, 1, 0, 0], dims=[8, 16, 16, 16], output_stride=8, stem_type="overlap")
    net = timm.create_model("convnext_atto", pretrained=False, num_classes=0, global_pool="", **kwargs)
    save_for_hf(net, directory, model_args=kwargs, safe_serialization=True)
    return net, kwargs


def test_generic_timm_cnn_loads_weights_published_by_timm(tmp_path):
    """A CNN saved the way timm publishes weights (config.json + model.safetensors) loads into ``trunk``,
    and so does the ``visual_encoder.*`` part of a full BLIP-2 state dict."""
    net, kwargs = _published_convnext(tmp_path)
    cnn = GenericTimmEncoder(model_name="convnext_atto", image_size=32, pretrained=str(tmp_path), **kwargs)
    x = images(32)
    with torch.no_grad():
        expected = net.forward_features(x).flatten(2).transpose(1, 2)  # [2, 4*4, 16]
    assert cnn(x).shape == (2, 16, 16)
    torch.testing.assert_close(cnn(x), expected, rtol=0, atol=0)
    again = GenericTimmEncoder(model_name="convnext_atto", image_size=32, **kwargs)
    again.load_pretrained({f"visual_encoder.{k}": v for k, v in net.state_dict().items()} | {"ln_vision.weight": x})
    torch.testing.assert_close(again(x), expected, rtol=0, atol=0)


def test_timm_export_supplies_its_architecture_and_sizes(tmp_path):
    """A timm export's config.json (architecture + model_args) builds the encoder: a config naming the directory
    need not repeat the CNN's sizes; naming another architecture is an error that names both."""
    net, _ = _published_convnext(tmp_path)
    cnn = GenericTimmEncoder(image_size=32, pretrained=str(tmp_path))
    x = images(32)
    with torch.no_grad():
        torch.testing.assert_close(cnn(x), net.forward_features(x).flatten(2).transpose(1, 2), rtol=0, atol=0)
    assert cnn.model_name == "convnext_atto" and cnn.num_features == 16
    with pytest.raises(ValueError, match="convnext_atto.*resnet18"):
        GenericTimmEncoder(model_name="resnet18", image_size=32, pretrained=str(tmp_path))


def test_cnn_position_channels_tell_tokens_apart(tmp_path):
    """position_channels appends fixed sin-cos channels of each token's row and column to a CNN's tokens:
    the features are unchanged, every cell of the grid gets a distinct code, and a ViT (or a width that is
    not a multiple of 4) is refused by name."""
    net, _ = _published_convnext(tmp_path)
    plain = GenericTimmEncoder(image_size=32, pretrained=str(tmp_path))
    placed = GenericTimmEncoder(image_size=32, pretrained=str(tmp_path), position_channels=8)
    x = images(32)
    out = placed(x)
    assert placed.num_features == plain.num_features + 8 and out.shape == (2, 16, 16 + 8)
    torch.testing.assert_close(out[..., :16], plain(x), rtol=0, atol=0)
    codes = out[0, :, 16:]  # [16 cells, 8]: the same for every image
    torch.testing.assert_close(codes, out[1, :, 16:], rtol=0, atol=0)
    assert torch.cdist(codes, codes).add(torch.eye(16) * 9).min() > 0.1  # 4x4 grid: all codes distinct
    with pytest.raises(ValueError, match="position_channels=6"):
        GenericTimmEncoder(image_size=32, pretrained=str(tmp_path), position_channels=6)
    with pytest.raises(ValueError, match="ViT"):
        GenericTimmEncoder(model_name="vit_base_patch16_224", image_size=32, embed_dim=24, depth=1, num_heads=2,
                           position_channels=8)


def test_pos_embed_interpolated_on_load_and_on_the_fly():
    small = tiny_eva()
    randomize_(small)
    big = tiny_eva(image_size=56)
    big.load_state_dict(small.state_dict())  # 1+4 -> 1+16 positions, resampled by the load hook
    assert big.pos_embed.shape == (1, 17, 32)
    torch.testing.assert_close(big.pos_embed[:, 0], small.pos_embed[:, 0])  # CLS entry kept
    grid = small.pos_embed[:, 1:].reshape(1, 2, 2, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(big.pos_embed[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 16, 32))
    # A 28-px model fed 56-px images resamples on the fly and agrees with the 56-px model.
    torch.testing.assert_close(small(images(56)), big(images(56)), rtol=1e-5, atol=1e-5)


def test_clip_interpolation_uses_align_corners():
    small = tiny_clip()
    randomize_(small)
    big = tiny_clip(image_size=56)
    big.load_state_dict(small.state_dict())
    grid = small.pos_embed[:, 1:].reshape(1, 2, 2, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=True)
    torch.testing.assert_close(big.pos_embed[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 16, 32))


def test_frozen_stays_eval_and_has_no_grad():
    enc = tiny_eva(drop_path_rate=0.5)
    assert not any(p.requires_grad for p in enc.parameters())
    parent = nn.Sequential(enc)
    parent.train()
    assert not enc.training and all(not m.training for m in enc.modules())
    x = images().requires_grad_(True)
    out = enc(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, enc(x))  # drop path stays off: deterministic


def test_trainable_with_grad_checkpointing_matches():
    plain = tiny_eva(freeze=False)
    ckpt = tiny_eva(freeze=False, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    plain.train(), ckpt.train()
    assert plain.training and all(p.requires_grad for p in plain.parameters())
    for enc in (plain, ckpt):
        enc(images()).square().mean().backward()
    for (name, p1), (_, p2) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)
    assert ckpt.layer_id("pos_embed") == 0 and ckpt.layer_id("blocks.1.attn.proj.weight") == 2


def test_precision_bf16_kept_and_fp16_upcast_on_cpu(monkeypatch):
    ref = tiny_eva()
    enc = tiny_eva(precision="bf16")
    assert all(p.dtype == torch.bfloat16 for p in enc.parameters())
    out = enc(images())
    assert out.dtype == torch.float32  # returned in the caller's dtype
    torch.testing.assert_close(out, ref(images()), rtol=0.1, atol=0.1)
    assert enc(images().bfloat16()).dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert all(p.dtype == torch.float32 for p in tiny_eva(precision="fp16").parameters())  # fp16 off CUDA -> fp32
    half = tiny_eva().half()  # fp16 weights that reached the CPU compute in fp32
    out = half(images())
    assert half.dtype == torch.float32 and out.dtype == torch.float32
    torch.testing.assert_close(out, ref(images()), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="precision"):
        tiny_eva(precision="int8")


def test_pretrained_none_never_downloads(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("download attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", forbidden)
    with torch.device("meta"):
        EvaViTG(image_size=224, pretrained=None)
        ClipViTL(image_size=224, pretrained=None)


# ------------------------------------------------------------------------------------------------------------------
# Weight layouts
# ------------------------------------------------------------------------------------------------------------------
def test_hf_vision_round_trip_matches_transformers(tmp_path):
    """Our EVA -> HF vision_model names -> transformers Blip2VisionModel: same tokens (after post_layernorm);
    and back: an HF vision state dict (with a non-zero key bias) loads into our encoder with equal outputs."""
    from safetensors.torch import save_file
    from transformers import Blip2VisionConfig, Blip2VisionModel

    ours = tiny_eva(depth=3)
    randomize_(ours)
    config = Blip2VisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                               image_size=28, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)
    hf = Blip2VisionModel(config).eval()
    hf_sd = timm_vision_to_hf(ours.state_dict())
    ln = nn.LayerNorm(32, eps=1e-6)
    randomize_(ln, seed=3)
    hf_sd["vision_model.post_layernorm.weight"], hf_sd["vision_model.post_layernorm.bias"] = ln.weight, ln.bias
    missing, unexpected = hf.load_state_dict({k.removeprefix("vision_model."): v for k, v in hf_sd.items()},
                                             strict=False)
    assert not missing and not unexpected
    with torch.no_grad():
        expected = hf(pixel_values=images()).last_hidden_state
        torch.testing.assert_close(ln(ours(images())), expected, rtol=1e-5, atol=1e-5)
        # interpolate_pos_encoding in HF == our resampling (bicubic, align_corners=False)
        expected56 = hf(pixel_values=images(56), interpolate_pos_encoding=True).last_hidden_state
        torch.testing.assert_close(ln(ours(images(56))), expected56, rtol=1e-5, atol=1e-5)

    # HF -> ours, through a safetensors file; a key bias (which EVA lacks) changes nothing (softmax-invariant).
    full = {f"vision_model.{k}": v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    for key in full:
        if key.endswith("qkv.bias"):
            full[key][32:64] = torch.randn(32)
    save_file(full, str(tmp_path / "model.safetensors"))
    back = tiny_eva(depth=3, pretrained=str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(ln(back(images())), expected, rtol=1e-5, atol=1e-5)


def openai_clip_reference(sd: dict, x: torch.Tensor, heads: int, depth: int) -> torch.Tensor:
    """OpenAI CLIP's visual tower written independently (nn.MultiheadAttention, QuickGELU), penultimate tokens."""
    x = F.conv2d(x, sd["conv1.weight"], stride=sd["conv1.weight"].shape[-1])  # [B, W, h, w]
    x = x.flatten(2).transpose(1, 2)
    cls = sd["class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd["positional_embedding"]
    width = x.shape[-1]
    x = F.layer_norm(x, (width,), sd["ln_pre.weight"], sd["ln_pre.bias"])
    for i in range(depth):
        p = f"transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict({"in_proj_weight": sd[p + "attn.in_proj_weight"], "in_proj_bias": sd[p + "attn.in_proj_bias"],
                              "out_proj.weight": sd[p + "attn.out_proj.weight"], "out_proj.bias": sd[p + "attn.out_proj.bias"]})
        h = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False)[0]
        h = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return x


def random_openai_clip_visual(width: int = 32, blocks: int = 3, grid: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    sd = {"conv1.weight": r(width, 3, 14, 14), "class_embedding": r(width),
          "positional_embedding": r(1 + grid * grid, width), "ln_pre.weight": 1 + r(width), "ln_pre.bias": r(width),
          "ln_post.weight": r(width), "ln_post.bias": r(width), "proj": r(width, 16)}
    for i in range(blocks):
        p = f"transformer.resblocks.{i}."
        sd.update({p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width), p + "ln_2.weight": 1 + r(width),
                   p + "ln_2.bias": r(width), p + "attn.in_proj_weight": r(3 * width, width),
                   p + "attn.in_proj_bias": r(3 * width), p + "attn.out_proj.weight": r(width, width),
                   p + "attn.out_proj.bias": r(width), p + "mlp.c_fc.weight": r(4 * width, width),
                   p + "mlp.c_fc.bias": r(4 * width), p + "mlp.c_proj.weight": r(width, 4 * width),
                   p + "mlp.c_proj.bias": r(width)})
    return sd


@pytest.mark.parametrize("prefix", ["", "visual."])
def test_openai_clip_weights_load(tmp_path, prefix):
    """A 3-block OpenAI CLIP visual tower (LAVIS clip_vit_L.pth layout, or a full CLIP file with ``visual.``)
    loads into the 2-block (penultimate) encoder and matches an independent reference forward."""
    sd = random_openai_clip_visual()
    stored = {prefix + k: v for k, v in sd.items()}
    if prefix:
        stored["text_projection"] = torch.randn(32, 16)  # the text tower of a full CLIP checkpoint is ignored
        stored["transformer.resblocks.0.ln_1.weight"] = torch.randn(32)
    torch.save(stored, tmp_path / "clip.pth")
    enc = tiny_clip(pretrained=str(tmp_path / "clip.pth"))
    with torch.no_grad():
        expected = openai_clip_reference(sd, images(), heads=2, depth=2)
        torch.testing.assert_close(enc(images()), expected, rtol=1e-4, atol=1e-4)


def lavis_clip_vit_l_state_dict(width: int, layers: int = 22, grid: int = 2) -> dict:
    """The state dict of LAVIS 1.0.2's ``create_clip_vit_L`` module, key names written out: ``VisionTransformer(...,
    layers=22)`` holds ``Transformer(width, layers - 1, heads)``, i.e. resblocks 0..20, and no ln_post / proj."""
    g = torch.Generator().manual_seed(3)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    sd = {"conv1.weight": r(width, 3, 14, 14), "class_embedding": r(width),
          "positional_embedding": r(1 + grid * grid, width), "ln_pre.weight": 1 + r(width), "ln_pre.bias": r(width)}
    for i in range(layers - 1):
        p = f"transformer.resblocks.{i}."
        sd.update({p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
                   p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
                   p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width), p + "mlp.c_fc.weight": r(4 * width, width),
                   p + "mlp.c_fc.bias": r(4 * width), p + "mlp.c_proj.weight": r(width, 4 * width),
                   p + "mlp.c_proj.bias": r(width), p + "ln_2.weight": 1 + r(width), p + "ln_2.bias": r(width)})
    return sd


def test_clip_vit_l_has_lavis_depth_and_loads_lavis_layout_strictly(tmp_path):
    """``clip_vit_l`` keeps 21 blocks by default; a LAVIS-layout ``clip_vit_L.pth`` of the 21-block module loads with
    every tensor used and nothing missing, and the tokens equal OpenAI CLIP's forward through block 21 (1e-5)."""
    sd = lavis_clip_vit_l_state_dict(width=32)
    torch.save(sd, tmp_path / "clip_vit_L.pth")
    enc = ClipViTL(image_size=28, embed_dim=32, num_heads=2, pretrained=str(tmp_path / "clip_vit_L.pth"))
    assert len(enc.blocks) == 21 and enc.num_layers == 21
    assert len(enc.state_dict()) == len(sd)  # one tensor of ours per LAVIS tensor, both ways
    with torch.no_grad():
        expected = openai_clip_reference(sd, images(), heads=2, depth=21)
        torch.testing.assert_close(enc(images()), expected, rtol=1e-5, atol=1e-5)
    short = {k: v for k, v in sd.items() if not k.startswith("transformer.resblocks.20.")}
    torch.save(short, tmp_path / "short.pth")
    with pytest.raises(KeyError, match="missing"):
        ClipViTL(image_size=28, embed_dim=32, num_heads=2, pretrained=str(tmp_path / "short.pth"))
    deeper = ClipViTL(image_size=28, embed_dim=32, num_heads=2, depth=23)  # the paper's "second last layer" option
    assert len(deeper.blocks) == 23


def test_lavis_eva_layout_and_bad_keys(tmp_path):
    """LAVIS eva_vit_g.pth keys equal timm's; an extra (40th-like) block and a final norm are dropped;
    a full BLIP-2 state dict's ``visual_encoder.*`` part works; unknown keys fail loudly."""
    src = tiny_eva(depth=3)
    randomize_(src)
    sd = dict(src.state_dict())
    sd["norm.weight"], sd["norm.bias"] = torch.ones(32), torch.zeros(32)
    torch.save({"model": sd}, tmp_path / "eva.pth")
    enc = tiny_eva(pretrained=str(tmp_path / "eva.pth"))
    ref = tiny_eva()
    ref.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("blocks.2.", "norm."))})
    torch.testing.assert_close(enc(images()), ref(images()))

    full = {f"visual_encoder.{k}": v for k, v in sd.items()} | {"ln_vision.weight": torch.ones(32)}
    enc2 = tiny_eva(pretrained=None)
    enc2.load_pretrained(full)
    torch.testing.assert_close(enc2(images()), ref(images()))

    with pytest.raises(KeyError, match="missing"):
        tiny_eva().load_pretrained({k: v for k, v in sd.items() if k != "pos_embed"})
    with pytest.raises(KeyError, match="unexpected"):
        tiny_eva().load_pretrained(sd | {"blocks.0.attn.bogus": torch.zeros(1)})
    assert math.isfinite(float(enc(images()).sum()))


def test_nested_load_resamples_pos_embed():
    """A BLIP-2 state dict saved at 28 px loads into a model built at 56 px: the encoder's load hook resamples
    ``visual_encoder.pos_embed`` (as for LAVIS/HF 224-px weights in a 364-px caption model)."""
    small, big = nn.Module(), nn.Module()
    small.visual_encoder, big.visual_encoder = tiny_eva(), tiny_eva(image_size=56)
    randomize_(small)
    big.load_state_dict(small.state_dict())
    assert big.visual_encoder.pos_embed.shape == (1, 17, 32)
    torch.testing.assert_close(small.visual_encoder(images(56)), big.visual_encoder(images(56)), rtol=1e-5, atol=1e-5)


def test_plain_vit_round_trips_through_hf_names():
    """A plain timm ViT (full q/k/v bias) -> HF vision names -> EVA-style q/v split -> loads back (the load hook
    rebuilds qkv.bias with a zero key bias, which changes no output)."""
    from models.checkpoints import hf_vision_to_timm

    torch.manual_seed(0)
    vit = GenericTimmEncoder(model_name="vit_base_patch16_224", image_size=32, embed_dim=24, depth=2, num_heads=2)
    randomize_(vit)
    split = hf_vision_to_timm(timm_vision_to_hf(vit.state_dict()))
    assert "blocks.0.attn.q_bias" in split and "blocks.0.attn.qkv.bias" not in split
    back = GenericTimmEncoder(model_name="vit_base_patch16_224", image_size=32, embed_dim=24, depth=2, num_heads=2)
    back.load_state_dict(split)
    torch.testing.assert_close(back(images(32)), vit(images(32)), rtol=1e-5, atol=1e-5)
