"""`python -m datasets.download`: plans, paths and post-processing, with the network replaced."""
from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import pytest
from omegaconf import DictConfig

import registry
from datasets import download
from tests.fixtures_data import builder_config, draw_image


def _no_network(url, dest):
    raise AssertionError(f"network used in a dry run: {url}")


def _builder_storage_paths(builder_cls, root) -> set[str]:
    """Every annotation (and extra file) path a builder's default YAMLs point to, under ``root``."""
    paths = set()
    for t in builder_cls.DATASET_CONFIG_DICT:
        builder = builder_cls(builder_config(registry.builders.names_of(builder_cls)[0], root, type=t))
        for split in builder.config.build_info.annotations.values():
            for entry in [split, *[v for v in split.values() if isinstance(v, DictConfig)]]:
                storage = entry.get("storage")
                for s in storage if not isinstance(storage, str) else [storage]:
                    if entry.get("url"):
                        paths.add(builder.resolve_path(s))
    return paths


@pytest.mark.parametrize("name", download.DATASETS)
def test_dry_run_plans_stay_under_root(name, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(download, "fetch_url", _no_network)
    lines = download.run_plan(download.make_plan(name), str(tmp_path), dry_run=True)
    out = capsys.readouterr().out
    assert lines[0] == f"# {name} -> {tmp_path}" and out.strip().splitlines() == lines
    for line in lines:
        if line.startswith("GET "):
            url, dest = line[4:].split(" -> ")
            assert url.startswith(("http://", "https://")) and dest.split(" ")[0].startswith(str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_every_builder_annotation_is_downloaded_where_the_builder_reads_it(tmp_path):
    for name in registry.builders.list():
        cls = registry.builders.get(name)
        if not getattr(cls, "download_name", None):
            continue
        assert cls.download_name in download.DATASETS, name
        planned = {os.path.join(str(tmp_path), f.dest) for f in download.make_plan(cls.download_name).fetches}
        missing = _builder_storage_paths(cls, tmp_path) - planned
        assert not missing, (name, sorted(missing))


def test_fetch_writes_files_and_rerun_keeps_them(tmp_path, monkeypatch):
    fetched = []

    def fake_fetch(url, dest):
        fetched.append(url)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        Path(dest).write_text(json.dumps({"from": url}))

    monkeypatch.setattr(download, "fetch_url", fake_fetch)
    download.main(["vqav2", "--root", str(tmp_path), "--annotations-only"])
    ann = tmp_path / "coco/annotations"
    assert json.loads((ann / "vqa_val_eval.json").read_text())["from"].endswith("/vqav2/vqa_val_eval.json")
    assert (ann / "answer_list.json").exists() and (ann / "v2_mscoco_val2014_annotations.json").exists()
    assert len(fetched) == 7 and not any("cocodataset.org" in u for u in fetched)
    fetched.clear()
    download.main(["vqav2", "--root", str(tmp_path), "--annotations-only"])
    assert fetched == []  # existing files are kept


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_archives_are_extracted_once(tmp_path, monkeypatch):
    draw_image(tmp_path / "src.jpg", seed=1)
    jpg = (tmp_path / "src.jpg").read_bytes()
    calls = []

    def fake_fetch(url, dest):
        calls.append(url)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if url.endswith(".zip"):
            folder = os.path.basename(url)[:-4]
            Path(dest).write_bytes(_zip_bytes({f"{folder}/COCO_{folder}_000000000001.jpg": jpg}))
        else:
            Path(dest).write_text("[]")

    monkeypatch.setattr(download, "fetch_url", fake_fetch)
    root = tmp_path / "root"
    download.main(["coco", "--root", str(root)])
    for folder in ("train2014", "val2014", "test2015"):
        assert (root / "coco/images" / folder / f"COCO_{folder}_000000000001.jpg").read_bytes() == jpg
    os.remove(root / "coco/images/val2014/COCO_val2014_000000000001.jpg")
    download.main(["coco", "--root", str(root)])
    assert not (root / "coco/images/val2014/COCO_val2014_000000000001.jpg").exists()  # marker: not re-extracted
    assert len(calls) == 6  # 3 annotation files + 3 zips, each fetched once


def test_msrvtt_videos_are_moved_into_place(tmp_path, monkeypatch):
    def fake_fetch(url, dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if url.endswith(".zip"):
            Path(dest).write_bytes(_zip_bytes({"MSRVTT/videos/all/video0.mp4": b"mp4", "MSRVTT/videos/all/video9.mp4": b"x"}))
        else:
            Path(dest).write_text("[]")

    monkeypatch.setattr(download, "fetch_url", fake_fetch)
    download.main(["msrvtt", "--root", str(tmp_path)])
    assert sorted(os.listdir(tmp_path / "msrvtt/videos")) == ["video0.mp4", "video9.mp4"]
    assert (tmp_path / "msrvtt/annotations/qa_ans2label.json").exists()


def test_cc12m_tsv_to_annotations_then_builder(tmp_path, monkeypatch):
    """TSV -> annotation JSON + images at the builder's paths; the builder then reads them."""
    draw_image(tmp_path / "pic.jpg", seed=3)
    pic = (tmp_path / "pic.jpg").read_bytes()
    tsv = tmp_path / "cc12m.tsv"
    tsv.write_text("http://x/a.jpg\ta dog on grass\nhttp://x/b.jpg\ta red car\nhttp://x/dead.jpg\tgone\n")

    def fake_fetch(url, dest):
        if "dead" in url:
            raise OSError("HTTP Error 404")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        Path(dest).write_bytes(pic)

    monkeypatch.setattr(download, "fetch_url", fake_fetch)
    download.main(["cc12m", "--root", str(tmp_path), "--tsv", str(tsv)])
    records = json.loads((tmp_path / "conceptual_caption/annotations/cc12m.json").read_text())
    assert [r["caption"] for r in records] == ["a dog on grass", "a red car", "gone"]
    assert records[1]["image"] == "00000/000000001.jpg"
    cfg = builder_config("conceptual_caption_12m", tmp_path,
                         vis_processor={"train": {"name": "blip_image_eval", "image_size": 16}})
    train = registry.builders.get("conceptual_caption_12m")(cfg).build_datasets()["train"]
    assert train[2]["text_input"] == "a dog on grass"  # the dead link is substituted by a readable sample
    assert train.num_bad_media == 1


def test_cc3m_needs_the_tsv(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "fetch_url", _no_network)
    with pytest.raises(FileNotFoundError, match="ConceptualCaptions"):
        download.main(["cc3m", "--root", str(tmp_path)])


def test_cli_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        download.main(["imagenet", "--root", "/tmp/x", "--dry-run"])
    assert "invalid choice" in capsys.readouterr().err
