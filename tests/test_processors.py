"""Processors: image transforms (shape, dtype, normalisation, randomness), PIL modes, bad files, text cleaning."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import processors
import registry
from processors import (
    CLIP_MEAN,
    CLIP_STD,
    BlipCaptionProcessor,
    BlipQuestionProcessor,
    ImageLoadError,
    ProcessorConfigError,
    build_processor,
    clean_caption,
    clean_question,
    load_image,
    to_rgb,
)

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def random_image(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------
# registration and construction
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, default_size",
    [("blip_image_train", 384), ("blip2_image_train", 364), ("blip_image_eval", 384)],
)
def test_image_processors_registered_with_lavis_defaults(name, default_size):
    proc = registry.processors.get(name).from_config(None)
    assert proc.image_size == default_size
    out = proc(random_image())
    assert out.shape == (3, default_size, default_size)
    assert out.dtype == torch.float32
    assert type(out) is torch.Tensor  # a plain tensor, not a torchvision tv_tensors.Image


def test_all_names_registered():
    names = set(registry.processors.list())
    assert {"base", "blip_image_train", "blip2_image_train", "blip_image_eval", "blip_caption", "blip_question"} <= names


def test_from_dictconfig_and_build_processor():
    cfg = OmegaConf.create({"name": "blip_image_eval", "image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
    proc = build_processor(cfg)
    assert proc.image_size == 32 and proc.mean == (0.5, 0.5, 0.5)
    out = proc(random_image())
    assert out.shape == (3, 32, 32) and out.min() >= -1.0 and out.max() <= 1.0
    identity = build_processor(None)
    marker = object()
    assert identity(marker) is marker
    assert build_processor({"name": "blip_caption", "prompt": "a photo of "})("A Dog.") == "a photo of a dog"


def test_unknown_processor_key_names_key_and_close_match():
    with pytest.raises(ProcessorConfigError) as err:
        build_processor({"name": "blip_image_train", "image_sise": 224})
    message = str(err.value)
    assert "image_sise" in message and "image_size" in message and "BlipImageTrainProcessor" in message
    with pytest.raises(ProcessorConfigError, match="no 'name'"):
        build_processor({"image_size": 224})
    with pytest.raises(registry.RegistryError, match="blip_image_eval"):
        build_processor({"name": "blip_image_evl"})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"image_size": 0}, "image_size"),
        ({"min_scale": 0.9, "max_scale": 0.5}, "min_scale"),
        ({"mean": [0.5, 0.5]}, "mean must have 3 values"),
        ({"std": [0.5, 0.0, 0.5]}, "std must be positive"),
        ({"randaug_magnitude": 20}, "0..10"),
    ],
)
def test_bad_image_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        registry.processors.get("blip_image_train").build(**options)


# ---------------------------------------------------------------------------------------------------
# normalisation and geometry
# ---------------------------------------------------------------------------------------------------
def test_eval_uniform_colour_gives_exact_clip_normalisation():
    colour = (200, 100, 30)
    proc = registry.processors.get("blip_image_eval").build(image_size=40)
    out = proc(Image.new("RGB", (70, 50), colour))
    expected = (torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255 - MEAN) / STD
    torch.testing.assert_close(out, expected.expand(3, 40, 40), atol=1e-5, rtol=0)


def test_eval_is_a_bicubic_resize_without_crop():
    image = random_image(80, 50)
    proc = registry.processors.get("blip_image_eval").build(image_size=48)
    pixels = proc(image) * STD + MEAN  # undo Normalize
    reference = np.asarray(image.resize((48, 48), Image.BICUBIC), dtype=np.float32) / 255
    torch.testing.assert_close(pixels, torch.from_numpy(reference).permute(2, 0, 1), atol=2e-3, rtol=0)


@pytest.mark.parametrize("name, size, extra", [("blip_image_eval", 48, {}), ("blip_image_eval", 64, {}),
                                               ("blip_image_train", 40, {}), ("blip2_image_train", 36, {})])
def test_images_equal_the_torchvision_pipeline_bit_for_bit(name, size, extra):
    """__call__ writes out ToImage/ToDtype/Normalize; it must give exactly what the v2 pipeline gives."""
    proc = registry.processors.get(name).build(image_size=size, mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25], **extra)
    for seed, (w, h) in enumerate([(64, 64), (90, 50), (size, size)]):
        image = random_image(w, h, seed=seed)
        torch.manual_seed(seed)
        ours = proc(image)
        torch.manual_seed(seed)  # the same random crop / flip / augmentation draw
        reference = proc.transform(image).as_subclass(torch.Tensor)
        assert ours.dtype == torch.float32 and ours.shape == (3, size, size) and ours.is_contiguous()
        assert torch.equal(ours, reference), (name, w, h, (ours - reference).abs().max().item())


def test_normalisation_statistics_follow_mean_and_std_overrides():
    image = random_image(64, 64)
    clip = registry.processors.get("blip_image_eval").build(image_size=64)(image)
    plain = registry.processors.get("blip_image_eval").build(image_size=64, mean=[0, 0, 0], std=[1, 1, 1])(image)
    assert 0.0 <= plain.min() and plain.max() <= 1.0
    # same pixels, only the affine normalisation differs
    torch.testing.assert_close(clip, (plain - MEAN) / STD, atol=1e-5, rtol=0)
    # uniform random pixels: mean ~0.5, so the CLIP-normalised channel means are (0.5 - mean) / std
    torch.testing.assert_close(clip.mean(dim=(1, 2)), (0.5 - MEAN.flatten()) / STD.flatten(), atol=0.05, rtol=0)


def test_train_crop_with_full_scale_is_resize_or_its_mirror():
    image = random_image(64, 64)
    crop = registry.processors.get("blip2_image_train").build(image_size=32, min_scale=1.0, max_scale=1.0)
    resize = registry.processors.get("blip_image_eval").build(image_size=32)(image)
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = crop(image)
        if torch.allclose(out, resize, atol=1e-5):
            flips.add(False)
        elif torch.allclose(out, resize.flip(-1), atol=1e-5):
            flips.add(True)
        else:
            raise AssertionError("a full-scale square crop must be the whole image, maybe mirrored")
    assert flips == {True, False}  # RandomHorizontalFlip(p=0.5) happened both ways


def test_train_processors_are_random_but_seeded():
    image = random_image(120, 90)
    for name in ("blip_image_train", "blip2_image_train"):
        proc = registry.processors.get(name).build(image_size=56)
        torch.manual_seed(1)
        a = proc(image)
        torch.manual_seed(1)
        b = proc(image)
        torch.manual_seed(2)
        c = proc(image)
        assert torch.equal(a, b), name
        assert not torch.allclose(a, c), name
        assert a.shape == (3, 56, 56) and a.dtype == torch.float32


def test_randaugment_is_optional_and_changes_pixels():
    image = random_image(64, 64)
    with_aug = registry.processors.get("blip_image_train").build(image_size=48, randaug=True)
    without = registry.processors.get("blip_image_train").build(image_size=48, randaug=False)
    assert "RandAugment" in repr(with_aug) and "RandAugment" not in repr(without)
    differs = 0
    for seed in range(8):
        torch.manual_seed(seed)
        a = with_aug(image)
        torch.manual_seed(seed)
        b = without(image)
        differs += not torch.allclose(a, b)
    assert differs >= 4  # two random ops per image; only Identity (or a no-op magnitude) leaves it unchanged


def test_accepts_path_and_numpy(tmp_path: Path):
    image = random_image(40, 30)
    path = tmp_path / "x.png"
    image.save(path)
    proc = registry.processors.get("blip_image_eval").build(image_size=16)
    from_pil = proc(image)
    torch.testing.assert_close(proc(path), from_pil)
    torch.testing.assert_close(proc(str(path)), from_pil)
    torch.testing.assert_close(proc(np.asarray(image)), from_pil)
    with pytest.raises(TypeError, match="PIL image"):
        proc(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="uint8"):
        proc(np.zeros((8, 8, 3), dtype=np.float32))


# ---------------------------------------------------------------------------------------------------
# PIL modes -> RGB
# ---------------------------------------------------------------------------------------------------
def _rgba() -> Image.Image:
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[:2] = (255, 0, 0, 255)  # opaque red
    arr[2:] = (0, 255, 0, 0)  # fully transparent green: must not show
    return Image.fromarray(arr, mode="RGBA")


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 255] + [255, 0, 0] + [0, 0, 0] * 254)  # index 0 blue, 1 red
    image.putpixel((0, 0), 0)
    image.info["transparency"] = 0  # index 0 is transparent
    return image


def _i16() -> Image.Image:
    arr = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)
    image = Image.fromarray(arr)
    assert image.mode.startswith("I;16")
    return image


MODE_CASES = {
    # mode: (builder, {pixel: expected RGB})
    "RGBA": (_rgba, {(0, 0): (255, 0, 0), (0, 3): (255, 255, 255)}),
    "P+transparency": (_palette_with_transparency, {(1, 1): (255, 0, 0), (0, 0): (255, 255, 255)}),
    "L": (lambda: Image.fromarray(np.array([[0, 77], [200, 255]], dtype=np.uint8), mode="L"),
          {(1, 0): (77, 77, 77), (0, 1): (200, 200, 200)}),
    "I;16": (_i16, {(1, 0): (255, 255, 255), (0, 1): (128, 128, 128), (1, 1): (1, 1, 1), (0, 0): (0, 0, 0)}),
    "CMYK": (lambda: Image.new("CMYK", (3, 3), (255, 0, 0, 0)), {(1, 1): (0, 255, 255)}),
    "LA": (lambda: Image.fromarray(np.array([[[50, 255], [50, 0]]], dtype=np.uint8), mode="LA"),
           {(0, 0): (50, 50, 50), (1, 0): (255, 255, 255)}),
    "1": (lambda: Image.new("1", (2, 2), 1), {(0, 0): (255, 255, 255)}),
    "F": (lambda: Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32), mode="F"),
          {(1, 0): (128, 128, 128), (0, 1): (255, 255, 255)}),
}


@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_to_rgb_every_mode(case):
    build, expected = MODE_CASES[case]
    rgb = to_rgb(build())
    assert rgb.mode == "RGB"
    for xy, colour in expected.items():
        assert rgb.getpixel(xy) == colour, (case, xy)


@pytest.mark.parametrize("case, suffix", [("RGBA", ".png"), ("P+transparency", ".png"), ("L", ".png"),
                                          ("I;16", ".png"), ("CMYK", ".jpg"), ("LA", ".png")])
def test_files_in_every_mode_load_as_rgb_and_process(tmp_path: Path, case, suffix):
    build, expected = MODE_CASES[case]
    path = tmp_path / f"img{suffix}"
    build().save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    if suffix == ".png":  # lossless: the exact colours survive
        for xy, colour in expected.items():
            assert loaded.getpixel(xy) == colour, (case, xy)
    else:  # CMYK JPEG: lossy, cyan within a few levels
        assert np.abs(np.asarray(loaded, dtype=int) - np.array(expected[(1, 1)])).max() <= 8
    out = registry.processors.get("blip2_image_train").build(image_size=8)(path)
    assert out.shape == (3, 8, 8) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------
# unreadable files
# ---------------------------------------------------------------------------------------------------
def test_truncated_jpeg_raises_naming_the_file(tmp_path: Path):
    path = tmp_path / "broken.jpg"
    random_image(128, 128).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as err:
        load_image(path)
    assert str(path) in str(err.value) and err.value.path == str(path)
    assert "truncated" in str(err.value)
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        registry.processors.get("blip_image_eval").build(image_size=8)(path)
    assert isinstance(err.value, OSError)  # datasets can catch it as an I/O problem


def test_non_image_and_missing_file_raise_naming_the_file(tmp_path: Path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    with pytest.raises(ImageLoadError, match="notes.jpg.*not an image"):
        load_image(text)
    with pytest.raises(ImageLoadError, match="missing.png.*no such file"):
        load_image(tmp_path / "missing.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.png"):
        registry.processors.get("blip_image_train").build(image_size=8)(empty)


# ---------------------------------------------------------------------------------------------------
# text cleaning
# ---------------------------------------------------------------------------------------------------
CAPTIONS = [
    ("A man riding a horse.", "a man riding a horse"),
    ("  Two   DOGS!!! playing  ", "two dogs playing"),
    ('He said "hello" (loudly)', "he said hello loudly"),
    ("3.5 apples", "3 5 apples"),
    ("time: 10:30;", "time 10 30"),
    ("tab\tseparated\nlines\n", "tab separated lines"),
    ("***stars***", "stars"),
    ("~#~", ""),
    ("don't stop, believing", "don't stop, believing"),
    ("Ünïcödé CAFÉ.", "ünïcödé café"),
    ("hyphen-ated words?", "hyphen-ated words?"),
    ("", ""),
    ("a.b.c", "a b c"),
    ("#hashtag~tilde*star", "hashtag tilde star"),
]

QUESTIONS = [
    ("What is the man riding?", "what is the man riding?"),
    ("Is it 3.5 meters?", "is it 35 meters?"),
    ('What does the sign say: "STOP"?', "what does the sign say stop?"),
    ("  How   many (visible) dogs  ", "how many visible dogs"),
    ("time:10:30", "time1030"),
    ("Why?!", "why?"),
    ("a . b", "a b"),
    ("Mr. Smith's car", "mr smith's car"),
    ("tab\tquestion\n", "tab question"),
    ("~~~", ""),
    ("WHO IS THERE;", "who is there"),
    ("Is this a #1 (best) seller*?", "is this a 1 best seller?"),
]


@pytest.mark.parametrize("raw, expected", CAPTIONS)
def test_caption_cleaning(raw, expected):
    assert clean_caption(raw) == expected
    assert BlipCaptionProcessor()(raw) == expected
    assert BlipCaptionProcessor(prompt="a photo of ")(raw) == "a photo of " + expected


@pytest.mark.parametrize("raw, expected", QUESTIONS)
def test_question_cleaning(raw, expected):
    assert clean_question(raw) == expected
    assert BlipQuestionProcessor()(raw) == expected


def test_max_words_truncation():
    long = " ".join(f"Word{i}." for i in range(80))
    caption = BlipCaptionProcessor.build(max_words=50)(long)
    assert caption.split(" ") == [f"word{i}" for i in range(50)]
    assert BlipCaptionProcessor.build(max_words=3, prompt="P: ")("one two three four") == "P: one two three"
    assert BlipQuestionProcessor.build(max_words=2)("What? is. that") == "what? is"
    assert clean_caption("one two", max_words=None) == "one two"
    with pytest.raises(ValueError, match="max_words"):
        BlipCaptionProcessor(max_words=0)


def test_text_processors_reject_non_strings():
    with pytest.raises(TypeError, match="caption must be a str"):
        BlipCaptionProcessor()(["a list"])
    with pytest.raises(TypeError, match="question must be a str"):
        BlipQuestionProcessor()(None)
    with pytest.raises(ProcessorConfigError, match="prompt"):
        BlipQuestionProcessor.build(prompt="Question: {}")  # questions take no prompt


def test_processors_package_exports_load_image():
    assert processors.load_image is load_image


# ---------------------------------------------------------------------------------------------------
# video clips: every frame gets the same random draw
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["blip_image_train", "blip2_image_train", "blip_image_eval"])
def test_process_frames_shape_and_one_draw_per_clip(name):
    proc = registry.processors.get(name).build(image_size=24)
    frame = np.asarray(random_image(40, 30))
    clip = np.stack([frame] * 4)  # [T, H, W, 3], four identical frames
    outs = []
    for seed in range(4):
        torch.manual_seed(seed)
        out = proc.process_frames(clip)
        assert out.shape == (3, 4, 24, 24) and out.dtype == torch.float32
        for t in range(1, 4):  # identical frames stay identical: crop/flip/RandAugment drawn once per clip
            assert torch.equal(out[:, t], out[:, 0])
        outs.append(out)
    if name != "blip_image_eval":
        assert any(not torch.allclose(outs[0], o) for o in outs[1:])


def test_process_frames_matches_image_path_and_accepts_frame_lists():
    proc = registry.processors.get("blip_image_eval").build(image_size=20)
    frames = [random_image(50, 40, seed=s) for s in range(3)]
    clip = proc.process_frames(frames)
    for t, frame in enumerate(frames):  # tensor vs PIL bicubic: at most ~1 grey level apart
        assert (clip[:, t] - proc(frame)).abs().max() <= 2.5 / 255 / min(CLIP_STD)
    torch.testing.assert_close(proc.process_frames(torch.from_numpy(np.stack([np.asarray(f) for f in frames]))), clip)
    with pytest.raises(ValueError, match="one size"):
        proc.process_frames([random_image(50, 40), random_image(30, 30)])
    with pytest.raises(TypeError, match=r"uint8 \[T, H, W, 3\]"):
        proc.process_frames(np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="at least one frame"):
        proc.process_frames([])
