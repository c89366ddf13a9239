"""Every project YAML loads, merges and validates; with ``model_type: tiny`` and the data pointed at
the LAVIS-layout fixture tree, each one builds its datasets and pulls a real batch; training configs also build their (tiny) model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import registry
from runners.config import Config
from runners.data import collate_fn_of

REPO_ROOT = Path(__file__).resolve().parents[1]
# Project YAMLs (a plugin's own dataset default configs under configs/ are not projects).
PROJECTS = sorted(p for p in (REPO_ROOT / "projects").rglob("*.yaml") if "configs" not in p.parent.parts)
PAPER_PROJECTS = [p for p in PROJECTS if not {"demo", "examples"} & set(p.relative_to(REPO_ROOT / "projects").parts)]
REQUIRED = ["stage1.yaml", "stage1_vitL.yaml", "stage2.yaml", "stage2_opt6.7b.yaml", "stage2_flant5xl.yaml",
            "stage2_flant5xxl.yaml", "caption_coco_ft.yaml", "vqav2_ft.yaml", "retrieval_coco_ft.yaml"]

# Swap the full-size weights for the offline tiny zoo type (nothing downloaded).
TINY_OPTIONS = ["model.model_type=tiny", "model.weights=none", "model.load_pretrained=False",
                "model.load_finetuned=False", "model.hf_hub_id=null", "model.image_size=64", "model.vit_precision=fp32"]


def _rel(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


def test_required_projects_exist_and_cite_the_paper():
    names = {p.name for p in PAPER_PROJECTS}
    assert set(REQUIRED) <= names
    evals = [p for p in PAPER_PROJECTS if p.parent.name == "eval"]
    assert len(evals) >= 20
    for path in PAPER_PROJECTS:
        text = path.read_text()
        assert "Table" in text.split("model:")[0], f"{_rel(path)}: the header must name the paper table it reproduces"


@pytest.mark.parametrize("path", PROJECTS, ids=_rel)
def test_project_loads_merges_and_validates(path):
    cfg = Config(path)
    run = cfg.run
    assert run.task in registry.tasks.list()
    assert cfg.model.arch in registry.models.list()
    if path in PAPER_PROJECTS:  # the zoo layer was merged in: the full model definition is there
        assert cfg.model.model_type and cfg.model.get("vit_model") and cfg.model.get("num_query_token")
    for name in cfg.datasets:
        assert name in registry.builders.list() or cfg.datasets[name].get("builder")
    if not run.get("evaluate"):
        assert run.get("init_lr") is not None and run.get("lr_sched") in registry.lr_schedulers.list()
    else:
        assert run.get("test_splits"), f"{_rel(path)}: an evaluation config needs test_splits"


@pytest.fixture(scope="module")
def fixture_tree(tmp_path_factory):
    from tests.fixtures_data import make_lavis_tree

    return make_lavis_tree(tmp_path_factory.mktemp("lavis_tree"), with_video=True)  # MSR-VTT projects too


def _first_batch(datasets: dict, splits: list[str]) -> tuple[str, dict]:
    for split in splits:
        for name, by_split in datasets.items():
            if split in by_split:
                ds = by_split[split]
                it = iter(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_fn_of(ds)))
                return split, next(it)
    raise AssertionError(f"no dataset has any of the splits {splits}")


@pytest.mark.slow
@pytest.mark.parametrize("path", PAPER_PROJECTS, ids=_rel)
def test_project_builds_on_tiny_model_and_fixture_data(path, fixture_tree, monkeypatch):
    monkeypatch.setenv("BLIP2_CACHE_ROOT", fixture_tree["root"])
    options = list(TINY_OPTIONS)
    cfg0 = Config(path)
    if "laion" in cfg0.datasets:
        options.append("datasets.laion.build_info.storage=laion/shards/{00000..00002}.tar")
    cfg = Config(path, options=options)
    task = registry.tasks.get(cfg.run.task).setup_task(cfg)
    datasets = task.build_datasets(cfg)
    run = cfg.run
    splits = list(run.get("train_splits") or []) if not run.get("evaluate") else list(run.get("test_splits"))
    split, batch = _first_batch(datasets, splits)
    assert batch["image"].shape[0] == 2 and batch["image"].shape[1] == 3  # video: [B, 3, T, H, W]
    if run.get("evaluate"):
        return  # evaluation configs use the same tiny models as the training configs below (built there)
    model = task.build_model(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert 0 < trainable <= total
    if cfg.model.get("freeze_vit", True):
        assert trainable < total  # the frozen ViT (and LLM) stay out of training
