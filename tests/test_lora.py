"""LoRA (peft) on the frozen LLM and the Q-Former of a tiny stage-2 model, trained by ``runners.train``: only the
adapters (and the parts that always train) are checkpointed, a resumed run ends bitwise where an uninterrupted one
does, and the export merges the adapters so the Hugging Face checkpoint computes what the adapted model computes."""
from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from models.lora import LoraSettings


def _config(tmp_path, root, job: str) -> str:
    start = tmp_path / "start.safetensors"  # the starting stage-2 weights: the frozen Q-Former base comes from them
    if not start.exists():
        from safetensors.torch import save_file

        from models import load_model

        torch.manual_seed(11)
        save_file({k: v.contiguous() for k, v in load_model("blip2_opt", "tiny").trainable_state_dict().items()},
                  str(start))
    cfg = {
        "model": {"arch": "blip2_opt", "model_type": "tiny", "weights": "lavis", "load_pretrained": True,
                  "pretrained": str(start),
                  "lora": {"target": ["llm", "qformer"], "r": 4, "alpha": 8, "dropout": 0.1}},
        "datasets": {"coco_caption": {
            "vis_processor": {"train": {"name": "blip_image_train", "image_size": 64}},
            "text_processor": {"train": {"name": "blip_caption"}}}},
        "run": {"task": "image_text_pretrain", "runner": "runner_iter", "max_iters": 4, "iters_per_inner_epoch": 4,
                "train_splits": ["train"], "lr_sched": "constant_lr", "init_lr": 5e-3, "weight_decay": 0.0,
                "batch_size_train": 2, "num_workers": 0, "seed": 7, "device": "cpu", "amp": "off",
                "output_dir": str(tmp_path / "out"), "job_name": job, "save_every_steps": 2, "keep_last_ckpts": 0},
    }
    path = tmp_path / f"{job}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def lavis_root(tmp_path_factory):
    from tests.fixtures_data import make_lavis_tree

    return make_lavis_tree(tmp_path_factory.mktemp("lora_tree"), with_video=False, with_shards=False)["root"]


def test_lora_settings_validate():
    with pytest.raises(ValueError, match="target must be one of"):
        LoraSettings(target="vision")
    with pytest.raises(KeyError, match="unknown keys"):
        LoraSettings.from_config({"target": "llm", "rank": 4})


def test_lora_stage2_trains_resumes_exactly_and_exports(tmp_path, lavis_root, monkeypatch):
    from models import load_hf_blip2
    from models.hf_export import export_to_hf
    from runners.inference import load_spec
    from runners.train import main as train

    monkeypatch.setenv("BLIP2_CACHE_ROOT", lavis_root)
    train(["--cfg", _config(tmp_path, lavis_root, "full")])
    full = tmp_path / "out" / "full" / "checkpoints"
    weights = load_file(full / "step_00000004" / "model.safetensors")
    llm_keys = [k for k in weights if k.startswith("opt_model.")]
    qformer_keys = [k for k in weights if k.startswith("Qformer.")]
    assert llm_keys and all("lora_" in k for k in llm_keys)  # the frozen LLM's own weights are never saved
    assert qformer_keys and all("lora_" in k for k in qformer_keys if not k.endswith("position_ids"))  # a constant
    assert {"query_tokens", "opt_proj.weight", "opt_proj.bias"} <= set(weights)
    lora_b = [k for k in llm_keys if "lora_B" in k]
    assert lora_b and all(weights[k].abs().sum() > 0 for k in lora_b)  # B starts at zero: it was trained

    # a second job resumes from the first one's step-2 checkpoint and must end bitwise where it ended
    resumed = tmp_path / "out" / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(full / "step_00000002", resumed / "step_00000002")
    train(["--cfg", _config(tmp_path, lavis_root, "resumed"), "--resume", "auto"])
    again = load_file(resumed / "step_00000004" / "model.safetensors")
    assert again.keys() == weights.keys()
    assert all(torch.equal(again[k], weights[k]) for k in weights)

    # the job directory is a model (adapters re-injected from its config); export merges them
    predictor = load_spec(str(tmp_path / "out" / "full"))
    model = predictor.model
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    samples = {"image": image, "text_input": ["a red circle", "a small blue square"]}
    with torch.no_grad():
        loss_lora = model(samples)["loss"]
        captions = model.generate({"image": image}, num_beams=2, max_length=6)
    out = export_to_hf(model, tmp_path / "hf")
    assert not any("lora_" in k for k in load_file(out / "model.safetensors"))
    assert not any("lora_" in n for n, _ in model.named_parameters())  # merged in place
    with torch.no_grad():
        torch.testing.assert_close(model(samples)["loss"], loss_lora, atol=1e-5, rtol=1e-5)
    merged = load_hf_blip2(str(out))
    with torch.no_grad():
        loss_merged = merged(samples)["loss"]
        assert merged.generate({"image": image}, num_beams=2, max_length=6) == captions
    # HF BLIP-2 has one layer-norm eps (1e-6) where the tiny model's ln_vision uses 1e-5: a small, known difference
    torch.testing.assert_close(loss_merged, loss_lora, atol=5e-3, rtol=0)
