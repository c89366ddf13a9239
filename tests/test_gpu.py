"""CUDA checks (marked ``gpu``: skipped without a CUDA device; run by ``benchmarks/gpu_check.sh``).

fp16 and bf16 autocast steps of stage 1 and stage 2 against fp32 on the same weights, generation on the GPU, and
the runner under ``torchrun --nproc_per_node=1`` with NCCL, plain DDP and FSDP. Tolerances as in
``tests/test_bf16.py``: losses to 3 % relative (fp16 keeps more mantissa bits than bf16, so the same bound holds).
"""
from __future__ import annotations

import pytest
import torch

from models.blip2_opt import Blip2OPT
from models.blip2_qformer import Blip2Qformer
from models.blip2_t5 import Blip2T5
from tests.test_bf16 import model_pair
from tests.test_runner import fake_plugin_dir  # noqa: F401  (fixture)

pytestmark = pytest.mark.gpu

TEXTS = ["a red circle", "a blue square to the left of a green star"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _images(n=2):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(1)).cuda()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("cls", [Blip2Qformer, Blip2OPT, Blip2T5])
def test_autocast_step_close_to_fp32(cls, precision):
    extra = {"itm_negatives": "hardest"} if cls is Blip2Qformer else {}
    ref, low = model_pair(cls, precision, "cuda", **extra)
    samples = {"image": _images(), "text_input": TEXTS, "image_id": torch.tensor([0, 1]).cuda()}
    ref.train(), low.train()
    expected = ref(samples)["loss"]
    with torch.autocast("cuda", dtype=DTYPES[precision]):
        loss = low(samples)["loss"]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=3e-2, atol=0)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    optimizer = torch.optim.AdamW([p for p in low.parameters() if p.requires_grad], lr=1e-4, fused=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert all(p.dtype == torch.float32 for p in low.parameters() if p.requires_grad)


@pytest.mark.parametrize("cls", [Blip2OPT, Blip2T5])
def test_generation_on_gpu_bf16(cls):
    _, low = model_pair(cls, "bf16", "cuda")
    low.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        captions = low.generate({"image": _images(3), "prompt": ""}, num_beams=3, max_length=5, min_length=5,
                                num_captions=2)
    assert len(captions) == 6 and all(isinstance(c, str) for c in captions)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_runner_under_torchrun_nccl_one_gpu(tmp_path, fake_plugin_dir, fsdp, monkeypatch):
    """One training step of the tiny stage-1 model through ``runners.cli`` under torchrun with NCCL on one GPU
    (DDP, or FSDP with every layer sharded): the job finishes and logs its step."""
    from tests.fixtures_data import make_lavis_tree
    from tests.test_ddp import tiny_ddp_config, torchrun, write_equal_length_captions
    from tests.test_runner import subprocess_env, write_yaml

    tree = tmp_path / "tree"
    make_lavis_tree(tree, with_video=False, with_shards=False)
    monkeypatch.setenv("BLIP2_CACHE_ROOT", str(tree))
    annotation = write_equal_length_captions(tree, tmp_path / "train.json")
    name = "fsdp" if fsdp else "ddp"
    cfg = tiny_ddp_config(tmp_path, "stage1", 4, name, annotation)
    cfg["run"].update(device="cuda", amp="bf16", dist_backend="nccl")
    if fsdp:
        cfg["run"]["fsdp"] = {"min_num_params": 1}
    env = subprocess_env(fake_plugin_dir)
    env["BLIP2_CACHE_ROOT"] = str(tree)
    torchrun(tmp_path, [write_yaml(tmp_path / f"{name}.yaml", cfg)], env, nproc=1)
    log = (tmp_path / "out" / name / "log.jsonl").read_text()
    assert log.count('"type": "train_step"') == 1
