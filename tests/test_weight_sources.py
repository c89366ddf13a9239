"""The weight planner: absent sources fail at once with one message naming each source, its size and its override,
before any image encoder is built; ``python -m models.fetch`` lists the plan and the memory per precision."""
from __future__ import annotations

import time

import pytest

from models import load_model, load_model_and_preprocess
from models.blip2_base import Blip2Base
from models.weight_sources import MissingWeightsError, plan_sources


@pytest.fixture
def no_encoder_built(monkeypatch, tmp_path):
    """Records every image-encoder construction; an empty torch hub cache (no downloaded URL counts as present)."""
    built = []
    original = Blip2Base.init_vision_encoder

    def spy(self, *args, **kwargs):
        built.append(kwargs.get("vit_model", args[0] if args else None))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Blip2Base, "init_vision_encoder", spy)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return built


def test_offline_hf_checkpoint_missing_fails_fast(no_encoder_built, capsys):
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError) as info:
        load_model_and_preprocess("blip2_t5", "pretrain_flant5xxl")
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[offline planner] blip2_t5/pretrain_flant5xxl failed after {elapsed:.3f} s")
    message = str(info.value)
    assert no_encoder_built == []  # nothing was built before the error
    assert "Salesforce/blip2-flan-t5-xxl" in message and "HF_HUB_OFFLINE" in message
    assert "google/flan-t5-xxl" not in message  # the HF checkpoint brings the LLM: its own hub id is not needed
    assert "hf_hub_id=/path/to/local/copy" in message and "model.hf_hub_id=" in message
    assert "45.6 GB" in message  # 12.23B params in fp32, estimated
    assert "python -m models.fetch blip2_t5 pretrain_flant5xxl" in message


def test_lavis_sources_listed_together(no_encoder_built):
    with pytest.raises(MissingWeightsError) as info:
        load_model("blip2_opt", "pretrain_opt2.7b", weights="lavis")
    message = str(info.value)
    assert no_encoder_built == []
    assert message.splitlines()[0].startswith("blip2_opt/pretrain_opt2.7b: 3 weight sources not available")
    for source, key in (("eva_vit_g.pth", "vit_pretrained"), ("blip2_pretrained_opt2.7b.pth", "pretrained"),
                        ("facebook/opt-2.7b", "opt_model")):
        line = next(i for i, text in enumerate(message.splitlines()) if source in text)
        assert f"{key}=/path/to/local/copy" in message.splitlines()[line + 1]


def test_missing_local_path_named(no_encoder_built, tmp_path):
    with pytest.raises(MissingWeightsError) as info:
        load_model("blip2_opt", "tiny", opt_model=str(tmp_path / "no_llm_here"))
    assert no_encoder_built == []
    assert "local paths do not exist" in str(info.value) and "opt_model=" in str(info.value)


def test_no_network_without_offline_flag(no_encoder_built, monkeypatch):
    import models.weight_sources as ws

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    probed = []
    monkeypatch.setattr(ws, "network_reachable", lambda kinds, timeout=1.0: probed.append(kinds) or False)
    with pytest.raises(MissingWeightsError, match="no network"):
        load_model("blip2", "pretrain")
    assert probed == [{"hub"}] and no_encoder_built == []


def test_tiny_models_plan_offline():
    from omegaconf import OmegaConf

    from models.zoo import _zoo_yaml

    sources = plan_sources("blip2_opt", _zoo_yaml("blip2_opt", "tiny").model)
    assert [(s.role, s.source, s.available) for s in sources] == [("frozen LLM", "tiny:opt", True)]
    cfg = OmegaConf.merge(_zoo_yaml("blip2", "tiny").model, {"tokenizer": "bert-base-uncased"})
    assert [(s.role, s.kind) for s in plan_sources("blip2", cfg)] == [("Q-Former tokenizer", "local")]  # bundled


def test_fetch_dry_run_lists_plan_and_memory(capsys):
    from models.fetch import main

    assert main(["blip2_opt", "tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "frozen LLM" in out and "tiny:opt" in out and "built offline" in out
    table = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("fp32", "bf16", "int8"))}
    assert set(table) == {"fp32", "bf16", "int8"}
    assert main(["blip2_t5", "pretrain_flant5xxl", "--dry-run"]) == 0  # a plan, no download
    out = capsys.readouterr().out
    assert "MISSING" in out and "model.hf_hub_id" in out


def test_training_build_checks_sources_first(no_encoder_built):
    """runners.train / evaluate build through Task.build_model: the same check runs there before anything is built."""
    from omegaconf import OmegaConf

    from models.zoo import _zoo_yaml
    from tasks.base_task import BaseTask

    model = OmegaConf.merge(_zoo_yaml("blip2_opt", "pretrain_opt2.7b").model,
                            {"arch": "blip2_opt", "model_type": "pretrain_opt2.7b", "weights": "lavis"})
    with pytest.raises(MissingWeightsError, match="3 weight sources not available"):
        BaseTask().build_model(OmegaConf.create({"model": model}))
    assert no_encoder_built == []
