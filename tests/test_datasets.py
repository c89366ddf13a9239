"""Datasets and builders on a small LAVIS-layout fixture tree (real JPEG/PNG/mp4/tar files)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

import registry
from datasets import (
    ConcatDataset,
    MixtureDataset,
    MixtureIterableDataset,
    collate_samples,
    combine_datasets,
    expand_braces,
)
from datasets.annotations import AnnotationError, load_annotation_file
from datasets.builders import DatasetBuildError
from datasets.caption_datasets import CaptionDataset
from datasets.media import BadMediaError, sample_frame_indices
from datasets.webdataset_stream import WebDatasetStream
from tests.fixtures_data import builder_config, make_lavis_tree, write_corrupt_image, write_shards

S = 24  # processed image side (tiny, fast)
PROCS = {
    "vis_processor": {"train": {"name": "blip2_image_train", "image_size": S},
                      "eval": {"name": "blip_image_eval", "image_size": S}},
}
IMAGE_BUILDERS = ["coco_caption", "coco_retrieval", "flickr30k", "nocaps", "coco_vqa", "ok_vqa", "gqa",
                  "vg_caption", "conceptual_caption_3m", "conceptual_caption_12m", "sbu_caption"]
VIDEO_BUILDERS = ["msrvtt_caption", "msrvtt_qa"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_lavis_tree(tmp_path_factory.mktemp("lavis"))


def build(name: str, root, **overrides):
    cfg = builder_config(name, root, **{**PROCS, **overrides})
    return registry.builders.get(name)(cfg).build_datasets()


def first_batch(dataset, batch_size: int = 2, **kw):
    return next(iter(DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collater, **kw)))


# -- every builder, train and eval side ------------------------------------------------------------
def test_all_builders_registered():
    names = set(registry.builders.list())
    assert set(IMAGE_BUILDERS + VIDEO_BUILDERS + ["laion", "image_text_pairs", "vqa_custom"]) <= names
    for name in IMAGE_BUILDERS + VIDEO_BUILDERS + ["laion", "image_text_pairs", "vqa_custom"]:
        cls = registry.builders.get(name)
        for t in cls.DATASET_CONFIG_DICT:
            text = Path(cls.default_config_path(t)).read_text()
            assert "/export" not in text and "${oc.env:BLIP2_CACHE_ROOT" in text, (name, t)


@pytest.mark.parametrize("name", IMAGE_BUILDERS)
def test_image_builder_batches(tree, name):
    splits = build(name, tree["root"])
    expected = {"nocaps": {"val", "test"}, "ok_vqa": {"train", "test"}}.get(
        name, {"train"} if name in ("vg_caption", "sbu_caption") or name.startswith("conceptual") else {"train", "val", "test"})
    assert set(splits) == expected
    for split, ds in splits.items():
        batch = first_batch(ds)
        b = min(2, len(ds))
        assert batch["image"].shape == (b, 3, S, S) and batch["image"].dtype == torch.float32
        assert len(batch["instance_id"]) == b
        if split == "train":
            assert len(batch["text_input"]) == b and all(isinstance(t, str) and t for t in batch["text_input"])
        if "image_id" in batch:
            assert batch["image_id"].dtype == torch.long and batch["image_id"].shape == (b,)


def test_caption_train_and_eval_ids(tree):
    ds = build("coco_caption", tree["root"])
    train = ds["train"]
    assert len(train) == 8 and train.num_image_ids == 4  # 2 captions per image
    ids = [train[i]["image_id"] for i in range(8)]
    assert ids == [0, 0, 1, 1, 2, 2, 3, 3]
    assert train[0]["text_input"] == train[0]["text_input"].lower()  # blip_caption cleaned it
    val = ds["val"]
    assert [val[i]["image_id"] for i in range(len(val))] == [42, 73]  # COCO ids from the file names
    gt = val.coco_ground_truth()
    assert [im["id"] for im in gt["images"]] == [42, 73] and len(gt["annotations"]) == 10
    assert len({a["id"] for a in gt["annotations"]}) == 10
    nocaps = build("nocaps", tree["root"])["val"]
    assert [nocaps[i]["image_id"] for i in range(2)] == [0, 1] and len(nocaps.ground_truth[0]) == 10
    assert nocaps.domains == {0: "in-domain", 1: "out-domain"}  # from the official image info file


def test_nocaps_domain_file_errors(tree, tmp_path):
    from datasets.caption_datasets import NoCapsEvalDataset

    ann = str(Path(tree["root"]) / "nocaps/annotations/nocaps_val.json")
    bad = tmp_path / "info.json"
    for content, match in [({"images": [{"id": 0, "domain": "in-domain"}]}, "no domain for 1"),
                           ({"images": [{"id": 0, "domain": "inside"}, {"id": 1, "domain": "in-domain"}]}, "inside"),
                           ([1, 2], "'images' list")]:
        bad.write_text(json.dumps(content))
        with pytest.raises((KeyError, ValueError), match=match):
            NoCapsEvalDataset(None, None, ann, str(Path(tree["root"]) / "nocaps/images"), is_train=False,
                              domain_file=str(bad))


def test_caption_ground_truth_loads_in_pycocotools(tree, tmp_path):
    from pycocotools.coco import COCO

    val = build("coco_caption", tree["root"])["test"]
    coco = COCO(val.write_coco_ground_truth(str(tmp_path / "gt" / "test_gt.json")))
    assert sorted(coco.getImgIds()) == [74, 133] and len(coco.getAnnIds(imgIds=[74])) == 5


def test_retrieval_eval_attributes(tree):
    test = build("coco_retrieval", tree["root"])["test"]
    assert len(test) == 2 and len(test.image) == 2 and len(test.text) == 10
    assert test.img2txt == {0: [0, 1, 2, 3, 4], 1: [5, 6, 7, 8, 9]}
    assert all(test.txt2img[t] == i for i, ts in test.img2txt.items() for t in ts)
    assert test.image[1].endswith("COCO_val2014_000000000133.jpg")
    batch = first_batch(test)
    assert batch["index"].tolist() == [0, 1]
    train = build("flickr30k", tree["root"])["train"]
    assert sorted({train[i]["image_id"] for i in range(len(train))}) == [0, 1, 2, 3]


def test_vqa_samples_and_eval_files(tree):
    ds = build("coco_vqa", tree["root"])
    sample = ds["train"][0]
    recs = json.loads((Path(tree["root"]) / "coco/annotations/vqa_train.json").read_text())
    answers = recs[0]["answer"]
    assert sorted(sample["answers"]) == sorted(set(answers))
    for a, w in zip(sample["answers"], sample["weights"]):
        assert w == pytest.approx(answers.count(a) / len(answers))
    assert sample["text_output"] == max(set(answers), key=lambda a: (answers.count(a), -answers.index(a)))
    assert sample["n_answers"] == len(set(answers)) and sample["question_id"] == 1000
    assert len(ds["train"]) == 6  # vqa_train + vqa_val concatenated
    val = ds["val"]
    assert val.answer_list == tree["vqa_answers"]
    assert Path(val.coco_question_file).name == "v2_OpenEnded_mscoco_val2014_questions.json"
    assert json.loads(Path(val.coco_annotation_file).read_text())["annotations"][0]["question_id"] == 3000
    batch = first_batch(val, batch_size=3)
    assert batch["question_id"] == [3000, 3001, 3002] and batch["n_answers"].dtype == torch.long
    assert ds["test"].answer_list == tree["vqa_answers"] and ds["test"].coco_question_file is None
    eval_only = registry.builders.get("coco_vqa")(builder_config("coco_vqa", tree["root"], type="eval", **PROCS))
    assert set(eval_only.build_datasets()) == {"val"}


def test_gqa_types_and_answers(tree):
    gqa = build("gqa", tree["root"])
    assert gqa["train"][0]["answers"] == ["left"] and gqa["train"][0]["text_output"] == "left"
    assert gqa["val"][1]["answers"] == ["yes"] and "answers" not in gqa["test"][0]
    cfg = builder_config("gqa", tree["root"], type="balanced_val", **PROCS)
    val = registry.builders.get("gqa")(cfg).build_datasets()["val"]
    assert [val[i]["question_id"] for i in range(2)] == ["021234", "031234"]


# -- generic builders --------------------------------------------------------------------------------
def test_image_text_pairs_csv_with_field_names(tree):
    root = Path(tree["root"])
    storage = {"build_info": {"annotations": {"train": {"storage": "my_pairs/annotations/train.csv"},
                                              "val": {"storage": "my_pairs/annotations/val.csv"}}}}
    ds = build("image_text_pairs", root, fields={"image": "file_name", "caption": "text"}, **storage)
    assert first_batch(ds["train"], 4)["image"].shape == (4, 3, S, S)
    assert ds["val"].coco_ground_truth()["images"] == [{"id": 0}, {"id": 1}]  # no digits -> contiguous ids
    ret = build("image_text_pairs", root, fields={"image": "file_name", "caption": "text"},
                eval_format="retrieval", **storage)["val"]
    assert len(ret.text) == 2 and ret.txt2img == {0: 0, 1: 1}


def test_vqa_custom_jsonl(tree):
    storage = {"build_info": {"annotations": {
        "train": {"storage": "my_vqa/annotations/train.jsonl"},
        "val": {"storage": "my_vqa/annotations/val.jsonl", "answer_list": {"storage": "my_vqa/annotations/answer_list.json"}}}}}
    ds = build("vqa_custom", tree["root"],
               fields={"image": "img", "question": "q", "answer": "a", "question_id": "qid"}, **storage)
    s = ds["train"][1]
    assert s["question_id"] == 71 and s["answers"] == ["1", "2"] and s["weights"] == pytest.approx([1 / 3, 2 / 3])
    assert s["text_output"] == "2" and ds["val"].answer_list == ["1", "2", "3"]


# -- errors: wrong field, missing paths ------------------------------------------------------------------
def test_wrong_annotation_field_names_file_and_keys(tree):
    storage = {"build_info": {"annotations": {"train": {"storage": "my_pairs/annotations/train.csv"}}}}
    with pytest.raises(AnnotationError) as err:
        build("image_text_pairs", tree["root"], **storage)
    msg = str(err.value)
    assert "train.csv" in msg and "'image'" in msg and "file_name" in msg and "fields:" in msg
    with pytest.raises(ValueError, match="unknown field name"):
        build("image_text_pairs", tree["root"], fields={"picture": "file_name"}, **storage)


def test_builder_refuses_a_whole_config_file(tree):
    whole = OmegaConf.create({"datasets": {"coco_caption": builder_config("coco_caption", tree["root"])}})
    with pytest.raises(ValueError, match=r"no `build_info` \(got a whole config file"):
        registry.builders.get("coco_caption")(whole)
    path = registry.builders.get("coco_caption").default_config_path()
    assert registry.builders.get("coco_caption")(path).config.build_info.images.storage == "coco/images"


def test_missing_annotation_or_image_dir_fails_early(tree, tmp_path):
    with pytest.raises(DatasetBuildError) as err:
        build("coco_caption", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "coco/annotations/coco_karpathy_train.json") in msg
    assert f"python -m datasets.download coco --root {tmp_path}" in msg
    ann = tmp_path / "coco/annotations"
    ann.mkdir(parents=True)
    for split in ("train", "val", "test"):
        (ann / f"coco_karpathy_{split}.json").write_text("[]")
    with pytest.raises(DatasetBuildError, match=r"image directory not found: .*coco/images \(from build_info.images.storage\)\. .*download coco"):
        build("coco_caption", tmp_path)
    # asking for fewer splits builds without the others' files
    (ann / "coco_karpathy_test.json").unlink()
    with pytest.raises(DatasetBuildError, match="coco_karpathy_test.json"):
        build("coco_caption", tmp_path)
    (tmp_path / "coco/images").mkdir()
    assert set(build("coco_caption", tmp_path, splits=["train", "val"])) == {"train", "val"}


# -- bad media policy ------------------------------------------------------------------------------------
def _pairs_with_corrupt(tmp_path, kind="truncated"):
    from tests.fixtures_data import draw_image

    for k in range(4):
        draw_image(tmp_path / "img" / f"{k}.jpg", seed=k)
    write_corrupt_image(tmp_path / "img" / "1.jpg", kind)
    records = [{"image": f"{k}.jpg", "caption": f"caption {k}"} for k in range(4)]
    (tmp_path / "ann.json").write_text(json.dumps(records))
    return str(tmp_path / "ann.json"), str(tmp_path / "img")


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_corrupt_image_skipped_counted_batch_kept(tmp_path, caplog, kind):
    ann, root = _pairs_with_corrupt(tmp_path, kind)
    vis = registry.processors.get("blip_image_eval").from_config({"image_size": S})
    ds = CaptionDataset(vis, None, ann, root)
    with caplog.at_level(logging.WARNING):
        batch = first_batch(ds, batch_size=4)
    assert batch["image"].shape == (4, 3, S, S)  # no shrinking
    assert batch["text_input"] == ["caption 0", "caption 2", "caption 2", "caption 3"]  # next readable sample
    assert ds.num_bad_media == 1 and "1.jpg" in caplog.text
    ds[1]
    assert ds.num_bad_media == 1  # a known bad file is not decoded (or counted) twice
    from datasets.caption_datasets import CaptionEvalDataset

    ev = CaptionEvalDataset(vis, None, ann, root, is_train=False)
    assert ev[1]["image_id"] == 1 and torch.equal(ev[1]["image"], ev[2]["image"])  # eval keeps identity


def test_bad_media_warnings_are_rate_limited(caplog):
    from datasets.media import LOG_EVERY, LOG_FIRST, report_bad_media

    log = logging.getLogger("test_bad_media")
    with caplog.at_level(logging.WARNING, logger="test_bad_media"):
        for count in range(1, 2 * LOG_EVERY + 1):
            report_bad_media(log, "X", BadMediaError("f.jpg", "broken"), count)
    assert len(caplog.records) == LOG_FIRST + 2 and "2000 skipped so far" in caplog.records[-1].getMessage()


def test_corrupt_image_error_policy(tmp_path):
    ann, root = _pairs_with_corrupt(tmp_path)
    ds = CaptionDataset(None, None, ann, root, bad_media_policy="error")
    with pytest.raises(BadMediaError, match=r"1\.jpg"):
        ds[1]
    missing = CaptionDataset(None, None, ann, str(tmp_path / "elsewhere"), bad_media_policy="error")
    with pytest.raises(BadMediaError, match="does not exist"):
        missing[0]
    with pytest.raises(ValueError, match="bad_media_policy"):
        CaptionDataset(None, None, ann, root, bad_media_policy="ignore")


def test_bad_media_policy_from_builder_config(tree, tmp_path):
    root = Path(tree["root"])
    pairs = build("sbu_caption", root)["train"]
    assert pairs.bad_media_policy == "skip"
    strict = build("sbu_caption", root, bad_media_policy="error")["train"]
    assert strict.bad_media_policy == "error"


# -- annotation formats and the collater -----------------------------------------------------------------
def test_annotation_formats(tmp_path):
    recs = [{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg", "caption": "y"}]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (tmp_path / "a.csv").write_text("image,caption\na.jpg,x\nb.jpg,y\n")
    (tmp_path / "a.tsv").write_text("image\tcaption\na.jpg\tx\nb.jpg\ty\n")
    for suffix in ("json", "jsonl", "csv", "tsv"):
        assert load_annotation_file(str(tmp_path / f"a.{suffix}")) == recs
    (tmp_path / "d.json").write_text(json.dumps({"k1": {"image": "a.jpg"}}))
    assert load_annotation_file(str(tmp_path / "d.json")) == [{"sample_id": "k1", "image": "a.jpg"}]
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(AnnotationError, match="bad.json"):
        load_annotation_file(str(tmp_path / "bad.json"))
    (tmp_path / "x.txt").write_text("image\n")
    with pytest.raises(AnnotationError, match="unsupported suffix"):
        load_annotation_file(str(tmp_path / "x.txt"))
    (tmp_path / "scalar.json").write_text("[1, 2]")
    with pytest.raises(AnnotationError, match="record 0 is a int"):
        load_annotation_file(str(tmp_path / "scalar.json"))


def test_packed_records_round_trip():
    from datasets.annotations import PackedRecords

    recs = [{"image": f"{i}.jpg", "caption": ["a", "b"][: i % 3], "id": i} for i in range(50)]
    packed = PackedRecords(recs)
    assert len(packed) == 50 and list(packed) == recs and packed[-1] == recs[-1] and packed[2:4] == recs[2:4]
    packed[3]["caption"].append("mutated")
    assert packed[3] == recs[3]  # read-only storage: each access is a fresh copy
    with pytest.raises(IndexError):
        packed[50]


def test_collater_types():
    samples = [{"image": torch.ones(3, 2, 2) * i, "image_id": i, "question_id": i, "instance_id": str(i),
                "ids_str": f"coco_{i}", "answers": ["a"], "n_answers": 1} for i in range(3)]
    samples[1]["extra"] = 1  # only keys every sample has are kept
    batch = collate_samples(samples)
    assert batch["image"].shape == (3, 3, 2, 2) and batch["image"][2, 0, 0, 0] == 2
    assert batch["image_id"].dtype == torch.long and batch["image_id"].tolist() == [0, 1, 2]
    assert batch["n_answers"].tolist() == [1, 1, 1]
    assert batch["question_id"] == [0, 1, 2] and batch["instance_id"] == ["0", "1", "2"]
    assert batch["ids_str"] == ["coco_0", "coco_1", "coco_2"] and "extra" not in batch
    assert collate_samples([{"image_id": "12"}, {"image_id": "7"}])["image_id"].tolist() == [12, 7]
    assert collate_samples([{"image_id": "a1"}, {"image_id": "7"}])["image_id"] == ["a1", "7"]
    with pytest.raises(ValueError, match="None"):
        collate_samples([samples[0], None])


# -- video -------------------------------------------------------------------------------------------------
def test_frame_sampling_indices():
    assert sample_frame_indices(12, 4, "uniform") == [1, 4, 7, 10]
    assert sample_frame_indices(3, 4, "uniform") == [0, 1, 1, 2]  # short clips repeat frames
    import random

    for seed in range(5):
        idx = sample_frame_indices(12, 4, "random", random.Random(seed))
        assert all(3 * i <= j < 3 * (i + 1) for i, j in enumerate(idx))
    with pytest.raises(ValueError, match="frame sampling"):
        sample_frame_indices(12, 4, "every")


@pytest.mark.parametrize("name", VIDEO_BUILDERS)
def test_video_builder_batches(tree, name):
    if not tree["has_video"]:
        pytest.skip("imageio[ffmpeg] not installed: no mp4 encoder to write the fixture videos")
    pytest.importorskip("decord", reason="decord not installed (pip install decord)")
    splits = build(name, tree["root"], n_frms=3)
    assert set(splits) == {"train", "val", "test"}
    for split, ds in splits.items():
        batch = first_batch(ds)
        b = min(2, len(ds))
        assert batch["image"].shape == (b, 3, 3, S, S)
    if name == "msrvtt_qa":
        assert splits["val"].answer_list == ["man", "car", "dog"]


def test_video_uniform_frames_are_the_expected_ones(tree):
    if not tree["has_video"]:
        pytest.skip("imageio[ffmpeg] not installed: no mp4 encoder to write the fixture videos")
    pytest.importorskip("decord", reason="decord not installed (pip install decord)")
    from torchvision.transforms.functional import pil_to_tensor

    from datasets.video_datasets import VideoCaptionEvalDataset

    root = Path(tree["root"]) / "msrvtt"
    ds = VideoCaptionEvalDataset(lambda im: pil_to_tensor(im).float(), None,
                                 str(root / "annotations/cap_test.json"), str(root / "videos"),
                                 is_train=False, n_frms=4)
    clip = ds[0]["image"]  # [3, T, H, W], frame t of the fixture has brightness 20 * t + tint
    means = clip.mean(dim=(0, 2, 3))
    steps = means[1:] - means[:-1]
    assert clip.shape[:2] == (3, 4) and torch.allclose(steps, torch.full((3,), 60.0), atol=6)
    assert ds[0]["image_id"] == 3  # from video3.mp4


def test_video_frames_share_one_augmentation(tree):
    if not tree["has_video"]:
        pytest.skip("imageio[ffmpeg] not installed: no mp4 encoder to write the fixture videos")
    pytest.importorskip("decord", reason="decord not installed (pip install decord)")
    import random

    from datasets.video_datasets import VideoCaptionDataset

    def draws(_frame):  # stands in for a random crop/flip: exposes the RNG draws it sees
        return torch.tensor([torch.rand(()).item(), random.random()])

    root = Path(tree["root"]) / "msrvtt"
    ds = VideoCaptionDataset(draws, None, str(root / "annotations/cap_train.json"), str(root / "videos"), n_frms=3)
    torch.manual_seed(0)
    random.seed(0)
    clip0, clip1 = ds[0]["image"], ds[1]["image"]  # [2, T]
    after = (torch.rand(()), random.random())
    torch.manual_seed(0)
    random.seed(0)
    assert after == (torch.rand(()), random.random())  # the caller's RNG streams were not consumed
    assert torch.equal(clip0, clip0[:, :1].expand(-1, 3))  # every frame saw the same draws
    assert not torch.equal(clip0[:, 0], clip1[:, 0])  # but clips differ
    assert torch.equal(ds[0]["image"], clip0)  # deterministic per (seed, epoch, index)
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], clip0)


def test_optional_libraries_are_not_imported_at_module_level():
    """decord / webdataset / imageio may only be imported inside functions (image-only installs work)."""
    import ast

    package = Path(__file__).resolve().parents[1] / "datasets"
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in ("decord", "webdataset", "imageio", "cv2"), (path, name)


# -- webdataset streaming -----------------------------------------------------------------------------------
def test_brace_expansion():
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{8..10}-{a,b}") == ["8-a", "8-b", "9-a", "9-b", "10-a", "10-b"]
    with pytest.raises(ValueError, match="empty range"):
        expand_braces("{3..1}")


def test_laion_builder_streams_batches(tree):
    cfg = builder_config("laion", tree["root"], build_info={"storage": "laion/shards/{00000..00002}.tar"},
                         shuffle_buffer=4, **PROCS)
    train = registry.builders.get("laion")(cfg).build_datasets()["train"]
    assert isinstance(train, WebDatasetStream) and len(train.shards) == 3
    loader = DataLoader(train, batch_size=5, collate_fn=train.collater)
    it = iter(loader)
    batches = [next(it) for _ in range(4)]  # 20 samples > 12 in the shards: resampled keeps going
    for b in batches:
        assert b["image"].shape == (5, 3, S, S) and b["image_id"].dtype == torch.long
        assert all(isinstance(t, str) and t for t in b["text_input"])
    missing = builder_config("laion", tree["root"], build_info={"storage": "laion/shards/{00000..00005}.tar"})
    with pytest.raises(DatasetBuildError, match=r"3 of 6 shard\(s\) not found, first: .*00003\.tar"):
        registry.builders.get("laion")(missing).build_datasets()


def _keys(stream, n, **loader_kw):
    out = []
    for b in DataLoader(stream, batch_size=2, collate_fn=stream.collater, **loader_kw):
        out += b["instance_id"]
        if len(out) >= n:
            return out[:n]
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_webdataset_resume_is_exact(tree, num_workers):
    pattern = tree["laion_pattern"]
    full = _keys(WebDatasetStream(pattern, shuffle_buffer=3, seed=5), 16, num_workers=num_workers)
    assert len(set(full[:12])) > 6  # shuffled and resampled, not one shard repeated
    resumed = WebDatasetStream(pattern, shuffle_buffer=3, seed=5)
    resumed.set_resume_step(3, batch_size=2)
    assert _keys(resumed, 10, num_workers=num_workers) == full[6:16]
    other = _keys(WebDatasetStream(pattern, shuffle_buffer=3, seed=6), 16, num_workers=num_workers)
    assert other != full


def test_webdataset_epoch_mode_and_corrupt_members(tmp_path, caplog):
    pattern = write_shards(tmp_path / "sh", n_shards=2, per_shard=3, corrupt=("s00_001",))
    stream = WebDatasetStream(pattern, resampled=False, shuffle_buffer=1)
    with caplog.at_level(logging.WARNING):
        keys = _keys(stream, 100)
    assert sorted(keys) == ["s00_000", "s00_002", "s01_000", "s01_001", "s01_002"]
    assert "s00_001" in caplog.text
    fixed = WebDatasetStream(pattern, resampled=False, samples_per_epoch=8)
    assert len(_keys(fixed, 100)) == 8  # cycles its shards to the fixed length (equal across ranks)


# -- several datasets -------------------------------------------------------------------------------------
def test_concat_and_mixture(tree):
    coco = build("coco_caption", tree["root"])["train"]
    vg = build("vg_caption", tree["root"])["train"]
    cat = combine_datasets([coco, vg])
    assert isinstance(cat, ConcatDataset) and len(cat) == len(coco) + len(vg)
    ids = [cat[i]["image_id"] for i in range(len(cat))]
    assert ids[:8] == [0, 0, 1, 1, 2, 2, 3, 3] and min(ids[8:]) == coco.num_image_ids  # shifted, no clash
    mix = combine_datasets({"coco": coco, "vg": vg}, {"coco": 3.0, "vg": 1.0}, seed=1, length=400)
    assert isinstance(mix, MixtureDataset) and len(mix) == 400
    which, index = mix.plan()
    assert 0.68 < (which == 0).mean() < 0.82
    counts = torch.bincount(torch.as_tensor(index[which == 1]), minlength=len(vg))
    assert counts.max() - counts.min() <= 1  # permutations cycled: every vg sample equally often
    again = MixtureDataset([coco, vg], [3, 1], length=400, seed=1)
    assert again[17]["text_input"] == mix[17]["text_input"]
    mix.set_epoch(1)
    assert not (mix.plan()[0] == which).all()
    batch = first_batch(mix, batch_size=4)
    assert batch["image"].shape == (4, 3, S, S)
    with pytest.raises(ValueError, match="no entry"):
        combine_datasets({"coco": coco, "vg": vg}, {"coco": 1.0})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mixture_iterable_with_stream(tree, num_workers):
    coco = build("coco_caption", tree["root"])["train"]
    cfg = builder_config("laion", tree["root"], build_info={"storage": "laion/shards/{00000..00002}.tar"}, **PROCS)
    laion = registry.builders.get("laion")(cfg).build_datasets()["train"]
    mix = combine_datasets([coco, laion], [1, 1], seed=0)
    assert isinstance(mix, MixtureIterableDataset)
    it = iter(DataLoader(mix, batch_size=3, collate_fn=mix.collater, num_workers=num_workers))
    batches = [next(it) for _ in range(4)]
    assert batches[0]["image"].shape == (3, 3, S, S) and batches[0]["image_id"].dtype == torch.long
    seen = [k for b in batches for k in b["instance_id"]]
    assert any(k.startswith("s0") for k in seen) and any(k.isdigit() for k in seen)  # both sources drawn
    resumed = MixtureIterableDataset([coco, laion], [1, 1], seed=0)
    resumed.set_resume_step(1, 3)
    it = iter(DataLoader(resumed, batch_size=3, collate_fn=resumed.collater, num_workers=num_workers))
    assert [k for _ in range(3) for k in next(it)["instance_id"]] == seen[3:]
