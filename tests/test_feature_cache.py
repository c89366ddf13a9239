"""The frozen-feature cache returns exactly what the encoder computed, and only runs it on misses."""
import torch
from torch import nn

from models.feature_cache import FrozenFeatureCache, encoder_fingerprint


class CountingEncoder(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, kernel_size=4, stride=4).to(dtype)
        self.calls = 0

    def forward(self, images):  # [B,3,16,16] -> [B,16,8]
        self.calls += images.shape[0]
        return self.proj(images.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)


def test_cached_features_equal_uncached_and_skip_the_encoder(tmp_path):
    torch.manual_seed(0)
    encoder = CountingEncoder()
    images = torch.randn(6, 3, 16, 16)
    cache = FrozenFeatureCache(tmp_path, encoder_fingerprint(encoder, 16))
    with torch.no_grad():
        uncached = encoder(images)
        first = cache.features(images, encoder)
        assert encoder.calls == 12 and cache.misses == 6 and cache.hits == 0
        second = cache.features(images[[5, 0, 3]], encoder)
    assert encoder.calls == 12 and cache.hits == 3
    assert torch.equal(first, uncached)
    assert torch.equal(second, uncached[[5, 0, 3]])
    # A new process (new cache object) reads the memory-mapped chunks from disk.
    reopened = FrozenFeatureCache(tmp_path, encoder_fingerprint(encoder, 16))
    assert len(reopened) == 6
    assert torch.equal(reopened.features(images, encoder), uncached)
    assert encoder.calls == 12


def test_bf16_features_round_trip_bitwise(tmp_path):
    encoder = CountingEncoder(torch.bfloat16)
    images = torch.randn(3, 3, 16, 16)
    cache = FrozenFeatureCache(tmp_path, encoder_fingerprint(encoder, 16))
    with torch.no_grad():
        cache.features(images, encoder)
        again = FrozenFeatureCache(tmp_path, encoder_fingerprint(encoder, 16)).features(images, encoder)
        assert again.dtype == torch.bfloat16
        assert torch.equal(again, encoder(images))


def test_fingerprint_changes_with_weights_and_image_size():
    encoder = CountingEncoder()
    base = encoder_fingerprint(encoder, 224)
    assert encoder_fingerprint(encoder, 364) != base
    with torch.no_grad():
        encoder.proj.weight.view(-1)[0] += 1.0
    assert encoder_fingerprint(encoder, 224) != base
    changed = encoder_fingerprint(encoder, 224)
    encoder.num_features = 99  # e.g. position channels appended to the same weights' output
    assert encoder_fingerprint(encoder, 224) != changed


def test_tiny_blip2_with_cache_gives_the_uncached_loss(tmp_path):
    from models import load_model

    torch.manual_seed(0)
    model = load_model("blip2_opt", "tiny")
    model.eval()
    size = model.visual_encoder.patch_embed.img_size[0] if hasattr(model.visual_encoder, "patch_embed") else 224
    samples = {"image": torch.randn(2, 3, size, size), "text_input": ["a red circle", "two blue squares"]}
    with torch.no_grad():
        uncached = model(samples)["loss"]
        model.enable_feature_cache(str(tmp_path))
        first = model(samples)["loss"]
        second = model(samples)["loss"]
    assert model.feature_cache.hits == 2 and model.feature_cache.misses == 2
    assert torch.equal(uncached, first) and torch.equal(first, second)
