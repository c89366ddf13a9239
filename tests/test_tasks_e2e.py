"""End-to-end task tests: tiny zoo models + the LAVIS-layout fixture tree, through the real builders.

Each task's evaluation produces its metric dict from real (tiny, random) BLIP-2 models and
datasets built by the registered builders; the numbers are checked against the metric
functions applied to the saved results.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

import tasks
from tasks.base_task import BaseTask


E2E_SIZE = 64  # the tiny models' image size
E2E_PROCS = {
    "vis_processor": {"train": {"name": "blip_image_eval", "image_size": E2E_SIZE},
                      "eval": {"name": "blip_image_eval", "image_size": E2E_SIZE}},
    "text_processor": {"train": {"name": "blip_caption"}, "eval": {"name": "blip_caption"}},
}


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """Fixture tree + one tiny model of each family (loaded once for all end-to-end tests)."""
    from models import load_model
    from tests.fixtures_data import builder_config, make_lavis_tree

    root = tmp_path_factory.mktemp("e2e")
    make_lavis_tree(root, with_video=False, with_shards=False)
    torch.manual_seed(0)
    models = {name: load_model(name, "tiny", is_eval=True) for name in ("blip2", "blip2_opt", "blip2_t5")}

    def config(task: str, datasets: list[str], **run) -> OmegaConf:
        return OmegaConf.create({
            "run": {"task": task, "output_dir": str(root / "out" / task), **run},
            "datasets": {name: builder_config(name, root, **E2E_PROCS) for name in datasets},
        })

    return {"root": root, "models": models, "config": config}


def _evaluate(task: BaseTask, model, dataset, split: str) -> dict:
    loader = DataLoader(dataset, batch_size=2, collate_fn=dataset.collater)
    task.before_evaluation(model, dataset, name="fixture")
    return task.after_evaluation(task.evaluation(model, loader), split, 0)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["blip2", "blip2_opt"])
def test_e2e_captioning(e2e, arch: str) -> None:
    cfg = e2e["config"]("captioning", ["coco_caption"], num_beams=2, max_len=6, min_len=1, prompt="a photo of",
                        caption_metrics=["Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"])
    task = tasks.setup_task(cfg)
    val = task.build_datasets(cfg)["coco_caption"]["val"]
    metrics = _evaluate(task, e2e["models"][arch], val, "val")
    assert set(metrics) == {"Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr", "num_images", "agg_metrics"}
    assert metrics["num_images"] == len(val) == 2
    assert all(np.isfinite(v) and v >= 0 for v in metrics.values())
    assert metrics["agg_metrics"] == pytest.approx(metrics["CIDEr"] + metrics["Bleu_4"])
    results = json.loads((task.result_dir / "fixture_val_epoch0.json").read_text())
    assert sorted(r["image_id"] for r in results) == sorted(val.ground_truth)
    assert all(isinstance(r["caption"], str) for r in results)


@pytest.mark.slow
@pytest.mark.parametrize("arch, method", [("blip2_opt", "generate"), ("blip2_opt", "rank"), ("blip2_t5", "generate")])
def test_e2e_vqa(e2e, arch: str, method: str) -> None:
    cfg = e2e["config"]("vqa", ["coco_vqa"], inference_method=method, max_len=3, num_beams=2,
                        prompt="Question: {} Short answer:")
    task = tasks.setup_task(cfg)
    val = task.build_datasets(cfg)["coco_vqa"]["val"]
    metrics = _evaluate(task, e2e["models"][arch], val, "val")
    assert metrics["num_questions"] == len(val) and "other" in metrics  # answer types from the official file
    assert 0.0 <= metrics["agg_metrics"] <= 100.0
    results = json.loads((task.result_dir / "fixture_val_epoch0.json").read_text())
    if method == "rank":
        assert all(r["answer"] in val.answer_list for r in results)
    # the metric equals the VQA accuracy of the saved answers against the official annotation file
    from tasks.metrics.vqa import vqa_scores
    from tasks.vqa import load_vqa_annotation_file

    gt = load_vqa_annotation_file(val.coco_annotation_file)
    predictions = {r["question_id"]: r["answer"] for r in results}
    assert metrics["agg_metrics"] == pytest.approx(vqa_scores(predictions, gt)["overall"])


@pytest.mark.slow
def test_e2e_gqa(e2e) -> None:
    cfg = e2e["config"]("gqa", ["gqa"], max_len=3, num_beams=1, prompt="Question: {} Short answer:")
    task = tasks.setup_task(cfg)
    val = task.build_datasets(cfg)["gqa"]["val"]
    metrics = _evaluate(task, e2e["models"]["blip2_opt"], val, "val")
    results = json.loads((task.result_dir / "fixture_val_epoch0.json").read_text())
    from tasks.metrics.vqa import gqa_exact_match

    expected = 100 * np.mean([gqa_exact_match(r["answer"], r["gt_answers"][0]) for r in results])
    assert metrics["num_questions"] == len(val) and metrics["agg_metrics"] == pytest.approx(expected)


@pytest.mark.slow
def test_e2e_retrieval(e2e) -> None:
    model = e2e["models"]["blip2"]
    for k_test in (1, 100):
        cfg = e2e["config"]("retrieval", ["coco_retrieval"], k_test=k_test)
        task = tasks.setup_task(cfg)
        test = task.build_datasets(cfg)["coco_retrieval"]["test"]
        loader = DataLoader(test, batch_size=2, collate_fn=test.collater)
        results = task.evaluation(model, loader)
        n_img, n_txt = len(test.image), len(test.text)
        assert results["score_i2t"].shape == (n_img, n_txt) and results["score_t2i"].shape == (n_txt, n_img)
        reranked = (results["score_i2t"] != -100.0).sum(1)
        assert (reranked == min(k_test, n_txt)).all()
        metrics = task.after_evaluation(results, "test", 0)
        # with 2 images and 10 captions, every correct image is within the top 5 and every caption within the top 10
        assert metrics["txt_r10"] == 100.0 and metrics["img_r5"] == 100.0
        assert metrics["agg_metrics"] == pytest.approx((metrics["txt_r1"] + metrics["txt_r5"] + metrics["txt_r10"]) / 3)
    # the ITM + ITC score of a re-ranked pair is the model's own ITM logit plus its ITC similarity
    feats, embeds = model.image_retrieval_features(torch.stack([test[i]["image"] for i in range(n_img)]))
    text_feat, ids, atts = model.text_retrieval_features(list(test.text))
    sim = (feats @ text_feat.t()).amax(1)  # [n_img, n_txt]
    itm = model.itm_scores(embeds[:1].expand(n_txt, -1, -1), ids, atts)
    np.testing.assert_allclose(results["score_i2t"][0], (itm + sim[0]).numpy(), atol=1e-4)
    # the itc_* recalls rank by the ITC similarity alone (before re-ranking)
    np.testing.assert_allclose(results["sim_i2t"], sim.numpy(), atol=1e-5)
    from tasks.metrics.retrieval import retrieval_metrics

    itc = retrieval_metrics(sim.numpy(), sim.t().numpy(), [list(test.img2txt[i]) for i in range(n_img)],
                            [int(test.txt2img[t]) for t in range(n_txt)])
    assert {f"itc_{k}": v for k, v in itc.items() if k != "agg_metrics"}.items() <= metrics.items()


@pytest.mark.slow
def test_e2e_pretrain_validation_loss(e2e) -> None:
    cfg = e2e["config"]("image_text_pretrain", ["coco_caption"])
    task = tasks.setup_task(cfg)
    train = task.build_datasets(cfg)["coco_caption"]["train"]
    torch.manual_seed(0)
    metrics = _evaluate(task, e2e["models"]["blip2"], train, "train")
    assert {"loss", "loss_itc", "loss_itm", "loss_itg", "agg_metrics"} <= set(metrics)
    assert np.isfinite(metrics["loss"]) and metrics["agg_metrics"] == -metrics["loss"]
    assert metrics["loss"] == pytest.approx(metrics["loss_itc"] + metrics["loss_itm"] + metrics["loss_itg"], rel=1e-5)
