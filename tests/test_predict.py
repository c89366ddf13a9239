"""``runners.predict`` on a folder of generated images with the offline ``tiny`` models: every subcommand, numbers
checked against the model's own forward paths, a training job directory as the model, and resume after a kill."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from runners.predict import main

REPO = Path(__file__).resolve().parents[1]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]


def make_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.new("RGB", (72 + i, 64), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        draw.ellipse((4 + 3 * i, 8, 40 + 3 * i, 44), fill=COLOURS[i % len(COLOURS)])
        sub = folder / ("nested" if i % 3 == 2 else "")
        sub.mkdir(exist_ok=True)
        paths.append(sub / f"img{i:02d}.png")
        image.save(paths[-1])
    return paths


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("predict") / "images"
    make_images(folder, 5)
    (folder / "broken.png").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def stage1():
    from runners.inference import load_spec

    torch.manual_seed(0)  # main() seeds with --seed (0) before building: the same random tiny weights
    return load_spec("blip2:tiny")


def _pixels(predictor, paths):
    return predictor.pixels([Image.open(p).convert("RGB") for p in paths])


def test_caption_folder_matches_generate(images, tmp_path):
    out = tmp_path / "captions.jsonl"
    assert main(["caption", "-m", "blip2_opt:tiny", str(images), "-o", str(out), "-b", "2", "--num-beams", "2",
                 "--max-length", "6", "--quiet"]) == 0
    recs = records(out)
    assert [Path(r["image"]).name for r in recs] == ["broken.png", "img00.png", "img01.png", "img03.png",
                                                    "img04.png", "img02.png"]  # sorted, recursive
    assert "not an image" in recs[0]["error"]
    from runners.inference import load_spec

    torch.manual_seed(0)
    predictor = load_spec("blip2_opt:tiny")
    paths = [r["image"] for r in recs[1:]]
    expected = predictor.model.generate({"image": _pixels(predictor, paths)}, num_beams=2, max_length=6)
    assert [r["caption"] for r in recs[1:]] == expected


def test_vqa_question_flag_and_jsonl(images, tmp_path):
    out = tmp_path / "answers.jsonl"
    img = images / "img00.png"
    assert main(["vqa", "-m", "blip2_opt:tiny", str(img), "-q", "what colour is it?", "-q", "how many shapes?",
                 "-o", str(out), "--num-beams", "2", "--quiet"]) == 0
    recs = records(out)
    assert [(r["question"], isinstance(r["answer"], str)) for r in recs] == [
        ("what colour is it?", True), ("how many shapes?", True)]
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"image": "images/img00.png", "question": "what colour is it?"}) + "\n")
    (tmp_path / "images").symlink_to(images)
    out2 = tmp_path / "answers2.jsonl"
    assert main(["vqa", "-m", "blip2_opt:tiny", "--questions", str(questions), "-o", str(out2), "--num-beams", "2",
                 "--quiet"]) == 0
    assert records(out2)[0]["answer"] == recs[0]["answer"]  # same image, same question, same answer
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "images/img00.png"}\n')
    assert main(["vqa", "--questions", str(bad), "-o", str(tmp_path / "x.jsonl")]) == 2


def test_vqa_answer_list_ranks(images, tmp_path):
    out = tmp_path / "ranked.jsonl"
    answers = tmp_path / "answers.txt"
    answers.write_text("red\nblue\ngreen\n")
    assert main(["vqa", "-m", "blip2_opt:tiny", str(images / "img00.png"), "-q", "what colour?", "--answer-list",
                 str(answers), "-o", str(out), "--quiet"]) == 0
    assert records(out)[0]["answer"] in {"red", "blue", "green"}


def test_itm_itc_match_model_forward(images, tmp_path, stage1):
    from models.blip2_qformer import Blip2ITM

    texts = ["a red circle", "a blue circle"]
    for head in ("itm", "itc"):
        out = tmp_path / f"{head}.jsonl"
        assert main([head, "-m", "blip2:tiny", str(images / "*.png"), "-t", texts[0], "-t", texts[1],
                     "-o", str(out), "--quiet"]) == 0
        recs = [r for r in records(out) if "error" not in r]
        assert len(recs) == 4  # the top-level images of the glob (img02 is nested)
        paths = [r["image"] for r in recs]
        for j, text in enumerate(texts):
            samples = {"image": _pixels(stage1, paths), "text_input": [text] * len(paths)}
            with torch.no_grad():
                ref = Blip2ITM.forward(stage1.model, samples, match_head=head)  # the released ITM/ITC formulas
            ref = ref.softmax(dim=1)[:, 1] if head == "itm" else ref[:, 0]
            got = torch.tensor([r[head][text] for r in recs])
            torch.testing.assert_close(got, ref.float(), atol=2e-6, rtol=0)  # JSON rounds to 6 decimals


def test_features_equal_extract_features(images, tmp_path, stage1):
    out = tmp_path / "features.jsonl"
    assert main(["features", "-m", "blip2:tiny", str(images / "img01.png"), "-o", str(out), "--quiet"]) == 0
    rec = records(out)[0]
    q, e = stage1.model.query_tokens.shape[1], stage1.model.vision_proj.out_features
    assert rec["shape"] == [q, e]
    ref = stage1.model.extract_features({"image": _pixels(stage1, [rec["image"]])}, mode="image").image_embeds_proj
    torch.testing.assert_close(torch.tensor(rec["features"]).view(q, e), ref[0], atol=1e-6, rtol=0)


def test_search_ranks_by_itc_then_itm(images, tmp_path, stage1):
    out = tmp_path / "search.jsonl"
    assert main(["search", "-m", "blip2:tiny", str(images), "-t", "a red circle", "--top-k", "3", "--rerank", "0",
                 "-o", str(out), "--quiet"]) == 0
    hits = records(out)[0]["results"]
    assert len(hits) == 3 and [h["itc"] for h in hits] == sorted((h["itc"] for h in hits), reverse=True)
    all_scores = {r["image"]: r["itc"]["a red circle"] for r in records(_itc_all(images, tmp_path)) if "itc" in r}
    assert [h["image"] for h in hits] == sorted(all_scores, key=lambda p: -all_scores[p])[:3]
    out2 = tmp_path / "search_rerank.jsonl"
    assert main(["search", "-m", "blip2:tiny", str(images), "-t", "a red circle", "--top-k", "2", "-o", str(out2),
                 "--quiet"]) == 0
    hits = records(out2)[0]["results"]
    assert len(hits) == 2 and hits[0]["itm"] >= hits[1]["itm"]


def _itc_all(images: Path, tmp_path: Path) -> Path:
    out = tmp_path / "itc_all.jsonl"
    assert main(["itc", "-m", "blip2:tiny", str(images), "-t", "a red circle", "-o", str(out), "--quiet"]) == 0
    return out


def test_job_directory_as_model(images, tmp_path, stage1):
    """A training job's directory (config.yaml + a step checkpoint of trainable weights) is a model spec."""
    from omegaconf import OmegaConf

    from models import load_model
    from models.blip2_qformer import Blip2ITM
    from runners.checkpointing import save_checkpoint

    trained = load_model("blip2", "tiny")
    with torch.no_grad():
        trained.itm_head.bias.add_(1.0)  # differs from a fresh tiny model
    job = tmp_path / "job"
    step = job / "checkpoints" / "step_00000003"
    save_checkpoint(step, {k: v.contiguous() for k, v in trained.trainable_state_dict().items()}, None, {"epoch": 0})
    model_cfg = OmegaConf.merge(OmegaConf.load(REPO / "models/configs/blip2_tiny.yaml").model, {"arch": "blip2"})
    OmegaConf.save(OmegaConf.create({"model": model_cfg}), job / "config.yaml")
    for spec in (job, step):
        out = tmp_path / f"{spec.name}.jsonl"
        assert main(["itm", "-m", str(spec), str(images / "img00.png"), "-t", "a red circle", "-o", str(out),
                     "--quiet"]) == 0
        samples = {"image": _pixels(stage1, [images / "img00.png"]), "text_input": ["a red circle"]}
        with torch.no_grad():
            ref = Blip2ITM.forward(trained.eval(), samples, match_head="itm").softmax(1)[0, 1]
        assert abs(records(out)[0]["itm"]["a red circle"] - float(ref)) < 2e-6


def test_bad_inputs_fail_before_the_model(tmp_path, capsys):
    assert main(["caption", str(tmp_path / "nowhere")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["caption", str(tmp_path)]) == 2  # a folder without images
    assert "no image" in capsys.readouterr().err
    assert main(["vqa", "-m", "blip2_opt:tiny", str(tmp_path), "-q", "  "]) == 2
    assert "non-empty" in capsys.readouterr().err
    make_images(tmp_path / "imgs", 1)
    assert main(["caption", "-m", "blip2_opt:nope", str(tmp_path / "imgs")]) == 2
    assert "choose one of" in capsys.readouterr().err


def test_resume_after_kill(tmp_path):
    """Kill a run mid-way (SIGKILL), tear its last line, run again: every image exactly once, the records written
    before the kill kept as they were, and the same captions as an uninterrupted run."""
    folder = tmp_path / "many"
    make_images(folder, 24)
    out = tmp_path / "captions.jsonl"
    cmd = [sys.executable, "-m", "runners.predict", "caption", "-m", "blip2_opt:tiny", str(folder), "-o", str(out),
           "-b", "1", "--num-beams", "3", "--max-length", "8", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    before = out.read_text()
    written = before.count("\n")
    assert 3 <= written < 24
    with open(out, "a") as fh:
        fh.write('{"image": "' + str(folder))  # a record torn by the kill
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    after = out.read_text()
    assert after.startswith(before)
    recs = records(out)
    assert len(recs) == 24 and len({r["image"] for r in recs}) == 24
    fresh = tmp_path / "fresh.jsonl"
    assert main(["caption", "-m", "blip2_opt:tiny", str(folder), "-o", str(fresh), "-b", "4", "--num-beams", "3",
                 "--max-length", "8", "--quiet"]) == 0
    assert {r["image"]: r["caption"] for r in recs} == {r["image"]: r["caption"] for r in records(fresh)}


def test_precision_and_quantised_llm_flags(images, tmp_path):
    """--precision bf16 (frozen parts in bf16, the rest under autocast; tiny shapes only on CPU) and an int8 LLM
    through --options both caption."""
    for flags in (["--precision", "bf16"], ["--options", "llm_kwargs.quantization=int8"]):
        out = tmp_path / f"{flags[0]}.jsonl"
        assert main(["caption", "-m", "blip2_opt:tiny", str(images / "img00.png"), "-o", str(out), "--num-beams", "2",
                     "--max-length", "4", "--quiet", *flags]) == 0
        assert isinstance(records(out)[0]["caption"], str)


def test_default_serve_specs_take_the_newest_trained_jobs(tmp_path):
    from runners.inference import default_serve_specs

    assert default_serve_specs(tmp_path) == ("blip2_opt:tiny", "blip2:tiny")  # nothing trained yet

    def job(name: str, arch: str, trained: bool, age: float) -> Path:
        path = tmp_path / "output" / name
        path.mkdir(parents=True)
        if trained:
            (path / "checkpoints" / "step_10").mkdir(parents=True)
        (path / "config.yaml").write_text(f"model:\n  arch: {arch}\n")
        stamp = time.time() - age
        os.utime(path / "config.yaml", (stamp, stamp))
        return path

    old_stage2 = job("runs/stage2_old", "blip2_opt", True, 100)
    new_stage2 = job("runs/stage2", "blip2_t5", True, 10)
    job("runs/eval_caption", "blip2_opt", False, 1)  # an evaluation job: no checkpoint of its own
    stage1 = job("other/stage1", "blip2", True, 50)
    assert default_serve_specs(tmp_path) == (str(new_stage2), str(stage1))
    assert old_stage2.exists()
