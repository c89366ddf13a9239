"""Task tests with small deterministic fake models on tiny in-memory datasets.

Each task's evaluation -> after_evaluation is checked against metrics computed independently
(by hand or by a brute-force reference), on one process and on two gloo ranks.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

import registry
import tasks
from tasks.base_task import BaseTask, call_with_supported_kwargs
from tasks.captioning import CaptionTask
from tasks.metrics.caption import caption_scores
from tasks.retrieval import RetrievalTask
from tasks.vqa import GQATask, VQATask


def _collate(samples: list[dict]) -> dict:
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif key in ("image_id", "index") and all(isinstance(v, int) for v in values):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


class ListDataset(Dataset):
    """Samples from a list; extra attributes (ground truth, answer lists) set by keyword."""

    def __init__(self, samples: list[dict], **attrs) -> None:
        self.samples = samples
        for k, v in attrs.items():
            setattr(self, k, v)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]

    def collater(self, samples: list[dict]) -> dict:
        return _collate(samples)


def _loader(ds: Dataset, batch_size: int = 2, sampler=None) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, sampler=sampler, collate_fn=ds.collater)


# -- setup, build_model, build_datasets, train_step -------------------------------------------------
class FakeLossModel(torch.nn.Module):
    """loss = mean((w - image mean)^2); also reports two named parts."""

    def __init__(self, init: float = 0.0) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(float(init)))

    @classmethod
    def from_config(cls, cfg) -> "FakeLossModel":
        return cls(init=cfg.get("init", 0.0))

    def forward(self, samples: dict) -> dict:
        err = (self.w - samples["image"].flatten(1).mean(1)) ** 2  # [B]
        return {"loss": err.mean(), "loss_a": err.mean() / 2, "loss_b": err.mean() / 2, "logits": err}


class FakeBuilder:
    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def build_datasets(self) -> dict:
        n = int(self.cfg.get("n", 3))
        return {"val": ListDataset([{"image": torch.full((3, 2, 2), float(i)), "text_input": "x"} for i in range(n)])}


@pytest.fixture
def fake_registrations():
    registry.models.add("test_fake_loss_model", FakeLossModel)
    registry.builders.add("test_fake_builder", FakeBuilder)
    yield
    registry.models.unregister("test_fake_loss_model")
    registry.builders.unregister("test_fake_builder")


def test_every_task_is_registered() -> None:
    names = set(registry.tasks.list())
    assert {"image_text_pretrain", "captioning", "vqa", "gqa", "retrieval"} <= names
    for name in ("image_text_pretrain", "captioning", "vqa", "gqa", "retrieval"):
        assert issubclass(registry.tasks.get(name), BaseTask)


def test_setup_build_model_datasets_and_train_step(fake_registrations, tmp_path: Path) -> None:
    cfg = OmegaConf.create({
        "run": {"task": "image_text_pretrain", "output_dir": str(tmp_path)},
        "model": {"arch": "test_fake_loss_model", "init": 1.0},
        "datasets": {"mine": {"builder": "test_fake_builder", "n": 4}},
    })
    task = tasks.setup_task(cfg)
    assert type(task).__name__ == "ImageTextPretrainTask" and task.output_dir == tmp_path
    model = task.build_model(cfg)
    assert isinstance(model, FakeLossModel) and model.w.detach().item() == 1.0
    datasets = task.build_datasets(cfg)
    assert list(datasets) == ["mine"] and len(datasets["mine"]["val"]) == 4

    batch = _collate([datasets["mine"]["val"][i] for i in range(4)])  # image means 0, 1, 2, 3
    loss, logs = task.train_step(model, batch)
    expected = np.mean([(1.0 - m) ** 2 for m in range(4)])  # 1.5
    assert loss.item() == pytest.approx(expected) and loss.requires_grad
    assert logs == pytest.approx({"loss": expected, "loss_a": expected / 2, "loss_b": expected / 2})

    with pytest.raises(KeyError, match="run.task is missing"):
        tasks.setup_task(OmegaConf.create({"run": {}}))
    with pytest.raises(KeyError, match="model.arch is missing"):
        task.build_model(OmegaConf.create({"model": {}}))
    with pytest.raises(registry.RegistryError, match="no entry 'nope'"):
        task.build_datasets(OmegaConf.create({"datasets": {"nope": {}}}))


def test_pretrain_validation_loss(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"run": {"output_dir": str(tmp_path)}})
    task = registry.tasks.get("image_text_pretrain").setup_task(cfg)
    model = FakeLossModel(init=1.0)
    model.train()
    ds = ListDataset([{"image": torch.full((3, 2, 2), float(i)), "text_input": "x"} for i in range(5)])
    results = task.evaluation(model, _loader(ds, batch_size=2))  # batches of 2, 2, 1
    assert model.training  # restored after evaluation
    metrics = task.after_evaluation(results, "val", 0)
    expected = np.mean([(1.0 - m) ** 2 for m in range(5)])  # per-sample mean, weighted by batch size
    assert metrics["loss"] == pytest.approx(expected)
    assert metrics["agg_metrics"] == pytest.approx(-expected)
    assert metrics["num_samples"] == 5
    assert json.loads((tmp_path / "result" / "val_epoch0_metrics.json").read_text())["loss"] == pytest.approx(expected)


def test_call_with_supported_kwargs_drops_unknown_options(caplog) -> None:
    def generate(samples, num_beams=1, max_length=5):
        return num_beams, max_length

    with caplog.at_level(logging.WARNING):
        assert call_with_supported_kwargs(generate, {}, num_beams=3, max_length=7, length_penalty=2.0) == (3, 7)
    assert "length_penalty" in caplog.text


# -- captioning --------------------------------------------------------------------------------------
VOCAB = ["a red circle", "two blue squares", "a green triangle on the left", "a small yellow star"]
REFERENCES = {
    10: ["a red circle", "one red circle in the middle"],
    11: ["two blue squares", "a pair of blue squares"],
    12: ["a green triangle", "green triangle at the left"],
    13: ["a big purple star", "one purple star"],
}


class FakeCaptioner(torch.nn.Module):
    """Caption = VOCAB[image value]; no length_penalty option (like the Q-Former decoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[dict] = []

    def generate(self, samples, use_nucleus_sampling=False, num_beams=5, max_length=30, min_length=1,
                 top_p=0.9, repetition_penalty=1.0):
        self.calls.append({"num_beams": num_beams, "max_length": max_length, "min_length": min_length,
                           "repetition_penalty": repetition_penalty, "prompt": samples.get("prompt")})
        return [VOCAB[int(img.flatten()[0])] for img in samples["image"]]


def _caption_dataset() -> ListDataset:
    samples = [{"image": torch.full((3, 2, 2), float(i)), "image_id": 10 + i} for i in range(4)]
    return ListDataset(samples, ground_truth=REFERENCES)


def test_captioning_task_scores_and_files(tmp_path: Path) -> None:
    run = {"output_dir": str(tmp_path), "num_beams": 3, "max_len": 12, "min_len": 2, "prompt": "a photo of",
           "length_penalty": 0.5, "caption_metrics": ["Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"]}
    task = CaptionTask.setup_task(OmegaConf.create({"run": run}))
    model = FakeCaptioner()
    results = task.evaluation(model, _loader(_caption_dataset(), batch_size=3))
    assert model.calls[0] == {"num_beams": 3, "max_length": 12, "min_length": 2, "repetition_penalty": 1.0,
                              "prompt": "a photo of"}
    assert results == [{"image_id": 10 + i, "caption": VOCAB[i]} for i in range(4)]
    metrics = task.after_evaluation(results, "val", 1)

    expected = caption_scores({10 + i: VOCAB[i] for i in range(4)}, REFERENCES,
                              metrics=["Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"])
    for k, v in expected.items():
        assert metrics[k] == pytest.approx(v), k
    assert metrics["agg_metrics"] == pytest.approx(expected["CIDEr"] + expected["Bleu_4"])
    assert metrics["num_images"] == 4
    saved = json.loads((tmp_path / "result" / "val_epoch1.json").read_text())
    assert saved == results
    gt = json.loads((tmp_path / "result" / "val_epoch1_gt_coco.json").read_text())
    assert len(gt["images"]) == 4 and len(gt["annotations"]) == 8


def test_captioning_from_annotation_file_and_record_references(tmp_path: Path) -> None:
    from tasks.captioning import caption_references
    from tasks.metrics.caption import write_coco_caption_gt

    gt_file = write_coco_caption_gt(REFERENCES, tmp_path / "gt.json")
    task = CaptionTask.setup_task(OmegaConf.create({"run": {"output_dir": str(tmp_path), "annotation_file": gt_file,
                                                            "caption_metrics": ["CIDEr"]}}))
    ds = ListDataset(_caption_dataset().samples)  # no ground truth on the dataset itself
    results = task.evaluation(FakeCaptioner(), _loader(ds))
    assert task.after_evaluation(results, "test", 0)["CIDEr"] > 0

    records = ListDataset([], annotation=[{"image_id": "7", "caption": ["a", "b"]}, {"image_id": 7, "caption": "c"}])
    assert caption_references(records) == {7: ["a", "b", "c"]}
    with pytest.raises(KeyError, match="lacks 'image_id' or 'caption'"):
        caption_references(ListDataset([], annotation=[{"image": "x.jpg"}]))
    with pytest.raises(TypeError, match="ground_truth"):
        caption_references(ListDataset([]))


def test_captioning_reports_nocaps_domains(tmp_path: Path) -> None:
    """A dataset with ``domains`` (NoCaps) gets each domain's scores and ``overall`` besides the top-level ones."""
    domains = {10: "in-domain", 11: "in-domain", 12: "near-domain", 13: "out-domain"}
    names = ["Bleu_4", "CIDEr"]
    task = CaptionTask.setup_task(OmegaConf.create({"run": {"output_dir": str(tmp_path), "caption_metrics": names}}))
    ds = ListDataset(_caption_dataset().samples, ground_truth=REFERENCES, domains=domains)
    metrics = task.after_evaluation(task.evaluation(FakeCaptioner(), _loader(ds)), "val", 0)
    predictions = {10 + i: VOCAB[i] for i in range(4)}
    for domain in ("in-domain", "near-domain", "out-domain"):
        ids = [i for i in predictions if domains[i] == domain]
        expected = caption_scores({i: predictions[i] for i in ids}, {i: REFERENCES[i] for i in ids}, metrics=names)
        assert metrics[domain]["num_images"] == len(ids)
        for name in names:
            assert metrics[domain][name] == pytest.approx(expected[name]), (domain, name)
    assert metrics["overall"]["CIDEr"] == metrics["CIDEr"] and metrics["overall"]["num_images"] == 4
    assert metrics["in-domain"]["CIDEr"] != pytest.approx(metrics["out-domain"]["CIDEr"])


# -- VQA / GQA --------------------------------------------------------------------------------------------
QUESTIONS = ["what color is it", "how many shapes", "what shape is it", "is it red"]
ANSWERS = {  # question_id -> 10 human answers
    100: ["red"] * 10,
    101: ["2"] * 2 + ["3"] * 8,
    102: ["circle"] * 3 + ["ball"] * 7,
    103: ["no"] * 10,
}
ANSWER_TYPES = {100: "other", 101: "number", 102: "other", 103: "yes/no"}


class FakeAnswerer(torch.nn.Module):
    """Answers by a lookup on the question; 'rank' picks the candidate with the most letters in common."""

    REPLIES = {"what color is it": "Red.", "how many shapes": "two", "what shape is it": "a circle", "is it red": "yes"}

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[dict] = []

    def predict_answers(self, samples, num_beams=5, inference_method="generate", max_len=10, min_len=1,
                        num_ans_candidates=128, answer_list=None, prompt="", length_penalty=-1):
        self.calls.append({"inference_method": inference_method, "prompt": prompt, "num_beams": num_beams,
                           "answer_list": answer_list})
        questions = [prompt.format(q) if prompt else q for q in samples["text_input"]]
        replies = [self.REPLIES[q.split(": ")[-1].replace(" Short answer:", "")] for q in questions]
        if inference_method == "rank":
            replies = [max(answer_list, key=lambda a: len(set(a) & set(r))) for r in replies]
        return replies


def _vqa_dataset(with_answers_in_batch: bool = False, **attrs) -> ListDataset:
    samples = []
    for i, qid in enumerate(ANSWERS):
        s = {"image": torch.zeros(3, 2, 2), "text_input": QUESTIONS[i], "question_id": qid}
        if with_answers_in_batch:
            s["answers"] = [ANSWERS[qid][0]]
        samples.append(s)
    records = [{"question_id": q, "answer": a, "answer_type": ANSWER_TYPES[q]} for q, a in ANSWERS.items()]
    return ListDataset(samples, annotation=records, **attrs)


def test_vqa_task_accuracy_per_answer_type(tmp_path: Path) -> None:
    run = {"output_dir": str(tmp_path), "prompt": "Question: {} Short answer:", "num_beams": 2}
    task = VQATask.setup_task(OmegaConf.create({"run": run}))
    model = FakeAnswerer()
    results = task.evaluation(model, _loader(_vqa_dataset()))
    assert model.calls[0]["prompt"] == "Question: {} Short answer:" and model.calls[0]["num_beams"] == 2
    metrics = task.after_evaluation(results, "val", 0)
    # red: 1.0; two vs 2x"2": 0.6; "a circle" -> "circle" x3: 0.9; yes vs no: 0
    assert metrics["agg_metrics"] == pytest.approx(100 * (1.0 + 0.6 + 0.9 + 0.0) / 4)
    assert metrics["other"] == pytest.approx(95.0)
    assert metrics["number"] == pytest.approx(60.0)
    assert metrics["yes/no"] == pytest.approx(0.0)
    saved = json.loads((tmp_path / "result" / "val_epoch0.json").read_text())
    assert [r["answer"] for r in saved] == ["Red.", "two", "a circle", "yes"]


def test_vqa_rank_among_each_questions_choices(tmp_path: Path) -> None:
    """Samples with ``choices`` (multiple choice): each question is ranked among its own choices, all of them
    re-scored, one predict_answers call per distinct choice list; images and ids stay with their questions."""
    choices = {100: ["blue", "red"], 101: ["1", "2", "3"], 102: ["square", "circle"], 103: ["yes", "no"]}
    samples = [{**s, "image": torch.full((3, 2, 2), float(s["question_id"])), "choices": choices[s["question_id"]]}
               for s in _vqa_dataset().samples]
    samples[2]["choices"] = choices[100]  # two questions share a choice list: one call for both
    run = {"output_dir": str(tmp_path), "inference_method": "rank"}
    task = VQATask.setup_task(OmegaConf.create({"run": run}))
    seen = []

    class Recorder(FakeAnswerer):
        def predict_answers(self, samples, **kwargs):
            seen.append((samples["image"][:, 0, 0, 0].tolist(), kwargs["num_ans_candidates"]))
            return super().predict_answers(samples, **kwargs)

    model = Recorder()
    results = task.evaluation(model, _loader(ListDataset(samples, answer_list=["never"]), batch_size=4))
    assert [c["answer_list"] for c in model.calls] == [["blue", "red"], ["1", "2", "3"], ["yes", "no"]]
    assert seen == [([100.0, 102.0], 2), ([101.0], 3), ([103.0], 2)]
    answers = {r["question_id"]: r["answer"] for r in results}
    # "Red." -> red; "two" shares no letter with a digit -> the first, "1"; "a circle" ties blue/red -> blue
    assert answers == {100: "red", 101: "1", 102: "blue", 103: "yes"}


def test_vqa_task_with_official_annotation_file_and_rank(tmp_path: Path) -> None:
    anno = {"annotations": [
        {"question_id": q, "answer_type": ANSWER_TYPES[q], "question_type": "x",
         "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(ans)]}
        for q, ans in ANSWERS.items()]}
    path = tmp_path / "anno.json"
    path.write_text(json.dumps(anno))
    run = {"output_dir": str(tmp_path), "inference_method": "rank"}
    task = VQATask.setup_task(OmegaConf.create({"run": run}))
    ds = ListDataset(_vqa_dataset().samples, coco_annotation_file=str(path), answer_list=["red", "2", "circle", "no"])
    model = FakeAnswerer()
    metrics = task.after_evaluation(task.evaluation(model, _loader(ds)), "val", 0)
    assert model.calls[0]["answer_list"] == ["red", "2", "circle", "no"]
    # rank picks: red (1.0), "2"? "two" shares no letter with "2" -> first max = "red"? computed below
    picks = [max(ds.answer_list, key=lambda a: len(set(a) & set(r))) for r in ("Red.", "two", "a circle", "yes")]
    from tasks.metrics.vqa import vqa_accuracy

    expected = 100 * np.mean([vqa_accuracy(p, ANSWERS[q]) for p, q in zip(picks, ANSWERS)])
    assert metrics["agg_metrics"] == pytest.approx(expected)

    no_list = ListDataset(_vqa_dataset().samples)
    with pytest.raises(ValueError, match="needs candidate answers"):
        task.evaluation(model, _loader(no_list))
    with pytest.raises(ValueError, match="inference_method"):
        VQATask.setup_task(OmegaConf.create({"run": {"inference_method": "beam"}}))


def test_vqa_lemmatizer_missing_spacy_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "spacy", None)
    task = VQATask.setup_task(OmegaConf.create({"run": {"output_dir": str(tmp_path), "apply_lemmatizer": True}}))
    with pytest.raises(ImportError, match="spacy"):
        task.evaluation(FakeAnswerer(), _loader(_vqa_dataset()))


def test_gqa_exact_match_task(tmp_path: Path) -> None:
    task = GQATask.setup_task(OmegaConf.create({"run": {"output_dir": str(tmp_path)}}))
    # gold answers travel in the batch: red, 2, circle, no -> predictions Red., two, a circle, yes
    results = task.evaluation(FakeAnswerer(), _loader(_vqa_dataset(with_answers_in_batch=True)))
    metrics = task.after_evaluation(results, "testdev", 0)
    assert metrics["agg_metrics"] == pytest.approx(75.0) and metrics["num_questions"] == 4
    # without gold answers in the batch they come from the dataset records (first answer)
    results = task.evaluation(FakeAnswerer(), _loader(_vqa_dataset()))
    assert task.after_evaluation(results, "testdev", 1)["agg_metrics"] == pytest.approx(75.0)


# -- retrieval -----------------------------------------------------------------------------------------
N_IMG, CAPS_PER_IMG, Q, E = 5, 2, 3, 8


class FakeRetriever(torch.nn.Module):
    """ITC features from fixed random tables; ITM = a fixed bilinear score of (image, text) ids."""

    def __init__(self, texts: list[str], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.text_index = {t: i for i, t in enumerate(texts)}
        self.text_table = F.normalize(torch.randn(len(texts), E, generator=g), dim=-1)
        self.itm_table = torch.randn(N_IMG, len(texts), generator=g)

    def image_retrieval_features(self, images):  # images [B, Q, E] (the fixture stores features as "images")
        image_idx = images[:, 0, 0].round().long()  # the image index rides in an extra channel, see below
        feats = F.normalize(images[:, 1:, :], dim=-1)  # [B, Q, E]
        embeds = image_idx.float().view(-1, 1, 1).expand(-1, 2, 4)  # [B, N=2, W=4]
        return feats, embeds

    def text_retrieval_features(self, texts):
        idx = [self.text_index[t] for t in texts]
        width = max(len(t.split()) for t in texts) + 1  # variable width per chunk
        ids = torch.zeros(len(texts), width, dtype=torch.long)
        atts = torch.zeros(len(texts), width, dtype=torch.long)
        for row, (i, t) in enumerate(zip(idx, texts)):
            n = len(t.split()) + 1
            ids[row, 0], atts[row, :n] = i, 1
        return self.text_table[idx], ids, atts

    def itm_scores(self, image_embeds, text_ids, text_atts):
        image_idx = image_embeds[:, 0, 0].round().long()
        assert text_atts[:, 0].all()
        return self.itm_table[image_idx, text_ids[:, 0]]


def _retrieval_dataset(seed: int = 0) -> ListDataset:
    g = torch.Generator().manual_seed(seed + 1)
    texts = [f"caption {i} of image {i // CAPS_PER_IMG}" + " word" * (i % 3) for i in range(N_IMG * CAPS_PER_IMG)]
    samples = []
    for i in range(N_IMG):
        image = torch.randn(Q + 1, E, generator=g)
        image[0, 0] = i  # the image index, read back by FakeRetriever
        samples.append({"image": image, "index": i, "image_id": i})
    return ListDataset(
        samples,
        text=texts,
        image=[f"img{i}.jpg" for i in range(N_IMG)],
        txt2img={t: t // CAPS_PER_IMG for t in range(len(texts))},
        img2txt={i: [i * CAPS_PER_IMG + j for j in range(CAPS_PER_IMG)] for i in range(N_IMG)},
    )


def _itc_sim(model: FakeRetriever, ds: ListDataset) -> np.ndarray:
    feats = torch.stack([F.normalize(s["image"][1:], dim=-1) for s in ds.samples])  # [I, Q, E]
    return torch.einsum("iqe,te->iqt", feats, model.text_table).amax(1).numpy()  # [I, T]


def _brute_force_scores(model: FakeRetriever, ds: ListDataset, k_test: int):
    sim = _itc_sim(model, ds)
    itm = model.itm_table.numpy()
    i2t = np.full(sim.shape, -100.0)
    t2i = np.full(sim.T.shape, -100.0)
    for i in range(sim.shape[0]):
        for t in np.argsort(-sim[i])[:k_test]:
            i2t[i, t] = itm[i, t] + sim[i, t]
    for t in range(sim.shape[1]):
        for i in np.argsort(-sim[:, t])[:k_test]:
            t2i[t, i] = itm[i, t] + sim[i, t]
    return i2t, t2i


@pytest.mark.parametrize("k_test", [1, 3, 100])
def test_retrieval_matches_brute_force(tmp_path: Path, k_test: int) -> None:
    ds = _retrieval_dataset()
    model = FakeRetriever(ds.text)
    task = RetrievalTask.setup_task(OmegaConf.create({"run": {"output_dir": str(tmp_path), "k_test": k_test,
                                                              "text_batch_size": 3, "itm_batch_size": 4}}))
    # a shuffled loader: the task must still place every image by its index
    loader = DataLoader(ds, batch_size=2, shuffle=True, collate_fn=ds.collater,
                        generator=torch.Generator().manual_seed(0))
    results = task.evaluation(model, loader)
    i2t, t2i = _brute_force_scores(model, ds, k_test)
    np.testing.assert_allclose(results["score_i2t"], i2t, atol=1e-5)
    np.testing.assert_allclose(results["score_t2i"], t2i, atol=1e-5)

    metrics = task.after_evaluation(results, "test", 0)
    from tasks.metrics.retrieval import retrieval_metrics

    img2txt, txt2img = [ds.img2txt[i] for i in range(N_IMG)], [ds.txt2img[t] for t in range(10)]
    expected = retrieval_metrics(i2t, t2i, img2txt, txt2img)
    assert {k: v for k, v in metrics.items() if not k.startswith("itc_")} == pytest.approx(expected)
    sim = _itc_sim(model, ds)  # ITC alone, before re-ranking
    itc = retrieval_metrics(sim, sim.T, img2txt, txt2img)
    assert {k: v for k, v in metrics.items() if k.startswith("itc_")} == pytest.approx(
        {f"itc_{k}": v for k, v in itc.items() if k != "agg_metrics"})
    assert set(metrics) >= {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean", "agg_metrics"}
    ranking = json.loads((tmp_path / "result" / "test_epoch0_ranking.json").read_text())
    assert len(ranking["i2t_top"]) == N_IMG and len(ranking["t2i_top"]) == N_IMG * CAPS_PER_IMG


def test_itc_similarity_chunks_and_pair_dedup() -> None:
    from tasks.retrieval import itc_similarity, pair_itm_scores

    g = torch.Generator().manual_seed(3)
    feats, text = torch.randn(7, 3, 5, generator=g), torch.randn(11, 5, generator=g)
    full = torch.einsum("iqe,te->iqt", feats, text).amax(1)
    torch.testing.assert_close(itc_similarity(feats, text, max_elements=40), full)  # chunks of 1 image

    calls = []

    class Counter(torch.nn.Module):
        def itm_scores(self, embeds, ids, atts):
            calls.append(len(ids))
            return embeds[:, 0, 0] * 100 + ids[:, 0].float()

    embeds = torch.arange(4.0).view(4, 1, 1)
    ids, atts = torch.arange(6).view(6, 1), torch.ones(6, 1, dtype=torch.long)
    img, txt = torch.tensor([0, 1, 0, 3, 1]), torch.tensor([2, 5, 2, 0, 5])  # two repeated pairs
    out = pair_itm_scores(Counter(), img, txt, embeds, ids, atts, batch_size=2)
    torch.testing.assert_close(out, torch.tensor([2.0, 105.0, 2.0, 300.0, 105.0]))
    assert calls == [2, 1]  # 3 distinct pairs in batches of 2

    class SharedImages(torch.nn.Module):  # itm_scores with image_index: distinct images passed once
        def itm_scores(self, embeds, ids, atts, image_index=None):
            calls.append(len(embeds))
            return embeds[image_index, 0, 0] * 100 + ids[:, 0].float()

    calls.clear()
    img, txt = torch.tensor([1, 1, 1, 2, 0]), torch.tensor([0, 3, 4, 0, 1])
    out = pair_itm_scores(SharedImages(), img, txt, embeds, ids, atts, batch_size=4)
    torch.testing.assert_close(out, torch.tensor([100.0, 103.0, 104.0, 200.0, 1.0]))
    assert calls == [2, 1]  # batch 1: pairs (0,1) (1,0) (1,3) (1,4) -> images {0, 1}; batch 2: image 2


def test_every_run_key_a_task_reads_is_declared() -> None:
    from runners.run_schema import RUN_SCHEMA

    class Recorder(dict):
        def __init__(self) -> None:
            super().__init__()
            self.read: set[str] = set()

        def get(self, key, default=None):
            self.read.add(key)
            return default

    for name in ("image_text_pretrain", "captioning", "vqa", "gqa", "retrieval"):
        cls = registry.tasks.get(name)
        run = Recorder()
        cls(run_cfg=run)
        undeclared = run.read - set(RUN_SCHEMA) - set(getattr(cls, "RUN_KEYS", {}))
        assert not undeclared, f"{name} reads undeclared run keys {undeclared}"


def test_retrieval_perfect_model_gets_full_recall(tmp_path: Path) -> None:
    ds = _retrieval_dataset()
    model = FakeRetriever(ds.text)
    # make ITM decisive: +10 for matching pairs
    model.itm_table = torch.tensor([[10.0 if ds.txt2img[t] == i else 0.0 for t in range(10)] for i in range(N_IMG)])
    task = RetrievalTask.setup_task(OmegaConf.create({"run": {"output_dir": str(tmp_path), "k_test": 10}}))
    metrics = task.after_evaluation(task.evaluation(model, _loader(ds)), "test", 0)
    assert metrics["txt_r1"] == 100.0 and metrics["img_r1"] == 100.0 and metrics["agg_metrics"] == 100.0
    with pytest.raises(TypeError, match="txt2img"):
        task.evaluation(model, _loader(ListDataset(ds.samples, text=ds.text)))


# -- two ranks (gloo): results merged on rank 0, retrieval rows split across ranks -----------------------
def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # VQA: each rank answers its shard (rank r takes r, r+W, ...), rank 0 merges and scores.
        ds = _vqa_dataset()
        shard = list(range(rank, len(ds), world))
        task = VQATask.setup_task(OmegaConf.create({"run": {"output_dir": out_dir}}))
        results = task.evaluation(FakeAnswerer(), _loader(ds, sampler=shard))
        vqa_metrics = task.after_evaluation(results, "val", 0)
        # Retrieval: every rank sees all images (the task re-reads the whole dataset), rows split.
        rds = _retrieval_dataset()
        rtask = RetrievalTask.setup_task(OmegaConf.create({"run": {"output_dir": out_dir, "k_test": 3}}))
        rres = rtask.evaluation(FakeRetriever(rds.text), _loader(rds, sampler=list(range(rank, N_IMG, world))))
        rmetrics = rtask.after_evaluation(rres, "test", 0)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"vqa": vqa_metrics, "retrieval": rmetrics, "i2t": rres["score_i2t"].tolist(),
                       "t2i": rres["score_t2i"].tolist()}, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~10 s idle, more on a loaded machine
def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    out_dir = tmp_path / "dist"
    out_dir.mkdir()
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(out_dir)), nprocs=2, join=True)
    per_rank = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]

    single_vqa = VQATask.setup_task(OmegaConf.create({"run": {"output_dir": str(tmp_path / "one")}}))
    vqa_expected = single_vqa.after_evaluation(single_vqa.evaluation(FakeAnswerer(), _loader(_vqa_dataset())), "val", 0)
    rds = _retrieval_dataset()
    single_ret = RetrievalTask.setup_task(OmegaConf.create({"run": {"output_dir": str(tmp_path / "one"), "k_test": 3}}))
    ret_results = single_ret.evaluation(FakeRetriever(rds.text), _loader(rds))
    ret_expected = single_ret.after_evaluation(ret_results, "test", 0)
    for r in range(2):  # both ranks return rank 0's metrics
        assert per_rank[r]["vqa"] == pytest.approx(vqa_expected)
        assert per_rank[r]["retrieval"] == pytest.approx(ret_expected)
        np.testing.assert_allclose(np.array(per_rank[r]["i2t"]), ret_results["score_i2t"], atol=1e-5)
        np.testing.assert_allclose(np.array(per_rank[r]["t2i"]), ret_results["score_t2i"], atol=1e-5)
    merged = json.loads((out_dir / "result" / "val_epoch0.json").read_text())
    assert sorted(r["question_id"] for r in merged) == sorted(ANSWERS)
    assert not list((out_dir / "result").glob("*_rank[0-9].json"))  # per-rank files merged away


def test_report_metric_false_only_writes_results(tmp_path: Path) -> None:
    unanswered = ListDataset(_vqa_dataset().samples, annotation=[{"question_id": q} for q in ANSWERS])
    task = VQATask.setup_task(OmegaConf.create({"run": {"output_dir": str(tmp_path)}}))
    results = task.evaluation(FakeAnswerer(), _loader(unanswered))
    with pytest.raises(KeyError, match="report_metric: false"):
        task.after_evaluation(results, "test", 0)
    task = VQATask.setup_task(OmegaConf.create({"run": {"output_dir": str(tmp_path), "report_metric": False}}))
    metrics = task.after_evaluation(task.evaluation(FakeAnswerer(), _loader(unanswered)), "test", 0)
    assert metrics == {"num_results": 4, "result_file": str(tmp_path / "result" / "test_epoch0.json")}
    assert len(json.loads(Path(metrics["result_file"]).read_text())) == 4


def test_id_value_keeps_non_canonical_digit_strings() -> None:
    from tasks.base_task import id_value

    assert id_value(torch.tensor(7)) == 7 and id_value(np.int64(3)) == 3 and id_value("42") == 42
    assert id_value("021234") == "021234" and id_value("coco_9") == "coco_9"


def test_single_process_never_touches_torch_distributed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.distributed used without a process group")

    for name in ("barrier", "broadcast_object_list", "all_reduce", "get_rank", "get_world_size", "all_gather_object"):
        monkeypatch.setattr(torch.distributed, name, forbidden)
    vqa = VQATask.setup_task(OmegaConf.create({"run": {"output_dir": str(tmp_path)}}))
    assert vqa.after_evaluation(vqa.evaluation(FakeAnswerer(), _loader(_vqa_dataset())), "val", 0)["num_questions"] == 4
    ds = _retrieval_dataset()
    ret = RetrievalTask.setup_task(OmegaConf.create({"run": {"output_dir": str(tmp_path), "k_test": 2}}))
    assert "agg_metrics" in ret.after_evaluation(ret.evaluation(FakeRetriever(ds.text), _loader(ds)), "test", 0)
    # only the merged results and the metrics were written: no per-rank files
    assert sorted(p.name for p in (tmp_path / "result").iterdir()) == [
        "test_epoch0_metrics.json", "test_epoch0_ranking.json", "val_epoch0.json", "val_epoch0_metrics.json"]
