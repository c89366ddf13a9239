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


def _open_in_another_process(root, fingerprint) -> str:
    """What a second process gets when it opens the cache: "opened" or the FeatureCacheBusy message."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\nfrom models.feature_cache import FrozenFeatureCache, FeatureCacheBusy\n"
            "try:\n    FrozenFeatureCache(sys.argv[1], sys.argv[2]).close()\n    print('opened')\n"
            "except FeatureCacheBusy as busy:\n    print(busy)\n")
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code, str(root), fingerprint], capture_output=True, text=True,
                          cwd=repo, timeout=120, check=True)
    return done.stdout.strip()


def test_one_process_at_a_time_writes_a_cache_directory(tmp_path):
    """Two jobs with the same frozen encoder (the default run.feature_cache_dir is shared) would append different
    images to the same rows: a second process is refused, naming the holder, until the first closes its caches."""
    import os

    encoder = CountingEncoder()
    fingerprint = encoder_fingerprint(encoder, 16)
    first = FrozenFeatureCache(tmp_path, fingerprint)
    same_process = FrozenFeatureCache(tmp_path, fingerprint)  # one process shares its lock (stage 1, then stage 2)
    refused = _open_in_another_process(tmp_path, fingerprint)
    assert refused.startswith(f"feature cache {first.dir} is in use by process {os.getpid()}"), refused
    first.close()
    assert _open_in_another_process(tmp_path, fingerprint).startswith("feature cache")  # still held by same_process
    same_process.close()
    assert _open_in_another_process(tmp_path, fingerprint) == "opened"
    reopened = FrozenFeatureCache(tmp_path, fingerprint)  # and this process can lock it again
    reopened.close()


def test_a_busy_cache_leaves_the_model_computing_its_features(tmp_path, caplog):
    import fcntl

    from models import load_model

    torch.manual_seed(0)
    model = load_model("blip2_opt", "tiny").eval()
    size = model.visual_encoder.patch_embed.img_size[0] if hasattr(model.visual_encoder, "patch_embed") else 224
    samples = {"image": torch.randn(2, 3, size, size), "text_input": ["a red circle", "two blue squares"]}
    model.enable_feature_cache(str(tmp_path))
    directory = model.feature_cache.dir
    model.feature_cache.close()
    model.feature_cache = None
    with open(directory / "lock", "a+") as other:  # another process's lock (a separate open file holds it)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.truncate(0)
        other.write("4242\n")  # the holder writes its pid
        other.flush()
        with caplog.at_level("WARNING"), torch.no_grad():
            model.enable_feature_cache(str(tmp_path))
            loss = model(samples)["loss"]
    assert model.feature_cache is None
    assert f"feature cache {directory} is in use by process 4242" in caplog.text
    model.enable_feature_cache(str(tmp_path))  # released: the cache is on again
    with torch.no_grad():
        assert torch.equal(model(samples)["loss"], loss) and model.feature_cache.misses == 2
