"""DDP and FSDP on CPU (gloo): one optimizer step on 2 ranks x batch b equals one process with batch 2b.

Cases: the fake model under DDP and under FSDP (``run.fsdp``, every layer sharded), the tiny stage-1
BLIP-2 with hardest and with sampled (multinomial) ITM negatives, and the tiny stage-2 OPT model with
captions of one length and with captions of different lengths on the two ranks (the LM loss is a
token mean over the global batch, not a mean of per-rank token means).

One ``torchrun --nproc_per_node=2`` launch runs a small driver that trains several configs in
turn through ``runners.cli.run`` (sharing one process group); the
single-process references run in-process. Dropout and augmentation noise are off so both layouts
see exactly the same computation; the global-batch sampler gives rank r the r-th contiguous slice
of each global batch, so the union of the ranks' batches is the single-process batch.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_runner import (  # noqa: F401  (fixture re-exported)
    REPO_ROOT,
    build_runner,
    fake_config,
    fake_plugin_dir,
    subprocess_env,
    write_yaml,
)

# Runs every config in one process group (re-initialising gloo on torchrun's store is not supported,
# so the group is kept between runs and destroyed once at the end).
DRIVER = """
import sys
from runners import distributed
from runners.cli import run
destroy, distributed.cleanup = distributed.cleanup, lambda: None
for cfg in sys.argv[1:]:
    run(["--cfg", cfg, "--plugins", "runner_fake_plugin"], training=True)
destroy()
"""


def torchrun(tmp_path: Path, configs: list[Path], env: dict, nproc: int = 2, timeout: float = 300) -> None:
    driver = tmp_path / "ddp_driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(driver), *map(str, configs)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"


def fake_ddp_config(tmp_path: Path, batch: int, name: str) -> dict:
    cfg = fake_config(tmp_path, max_epoch=1, batch_size_train=batch, valid_splits=[], test_splits=[],
                      job_name=name, init_lr=0.05, warmup_steps=0, warmup_lr=-1, log_freq=1)
    cfg["model"]["dropout"] = 0.0
    cfg["datasets"]["fake_regression"].update(num_samples=8, noise=0.0)
    return cfg


def step_weights(job_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(job_dir / "checkpoints" / "step_00000001" / "model.safetensors")


def tiny_ddp_config(tmp_path: Path, stage: str, batch: int, name: str, annotation: Path) -> dict:
    """One optimizer step of a tiny BLIP-2 stage with every random choice switched off: no dropout,
    deterministic preprocessing, hardest ITM negatives; captions of equal token length so that a
    per-rank token-mean loss averages to the global one."""
    procs = {"vis_processor": {"train": {"name": "blip_image_eval", "image_size": 64}},
             "text_processor": {"train": {"name": "blip_caption"}},
             "build_info": {"annotations": {"train": {"storage": str(annotation)}}}}
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model = {"arch": "blip2", "model_type": "tiny", "itm_negatives": "hardest", "qformer_config": no_dropout}
    if stage == "stage2":
        model = {"arch": "blip2_opt", "model_type": "tiny", "qformer_config": no_dropout}
    return {
        "model": model,
        "datasets": {"coco_caption": procs},
        "run": {"task": "image_text_pretrain", "runner": "runner_iter", "max_iters": 1, "iters_per_inner_epoch": 1,
                "lr_sched": "constant_lr", "init_lr": 1e-3, "weight_decay": 0.05, "beta2": 0.98,
                # Adam's first update is lr * g / (|g| + eps): with the default eps a gradient that is ~0 up to
                # rounding can flip sign and move a weight by a full lr. eps = 1e-3 keeps the update linear in
                # small gradients, so 1e-5 on the weights checks the gradients to ~1e-5.
                "adam_eps": 1e-3,
                "batch_size_train": batch, "num_workers": 0, "seed": 11, "device": "cpu", "amp": "off", "log_freq": 1,
                "output_dir": str(tmp_path / "out"), "job_name": name, "train_splits": ["train"]},
    }


def write_varied_length_captions(root: Path, path: Path) -> Path:
    """4 fixture images with captions of 3, 5, 12 and 16 words: however the sampler splits them, the two ranks
    hold different token counts."""
    import json

    images = sorted((root / "coco" / "images" / "train2014").glob("*.jpg"))[:4]
    captions = ["a red circle", "a blue square on grass",
                "a green triangle on the left of a small yellow star in a field",
                "a yellow star above the big red circle and the blue square on the right side of it"]
    records = [{"image": f"train2014/{img.name}", "caption": c, "image_id": f"coco_{i + 1}"}
               for i, (img, c) in enumerate(zip(images, captions))]
    path.write_text(json.dumps(records))
    return path


def write_equal_length_captions(root: Path, path: Path) -> Path:
    """4 distinct fixture images with captions of one fixed shape (same token count)."""
    import json

    images = sorted((root / "coco" / "images" / "train2014").glob("*.jpg"))[:4]
    assert len(images) == 4
    words = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star")]
    records = [{"image": f"train2014/{img.name}", "caption": f"a {c} {s} on the left", "image_id": f"coco_{i + 1}"}
               for i, (img, (c, s)) in enumerate(zip(images, words))]
    path.write_text(json.dumps(records))
    return path


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process_double_batch(tmp_path, fake_plugin_dir, monkeypatch):
    from tests.fixtures_data import make_lavis_tree

    tree = tmp_path / "tree"
    make_lavis_tree(tree, with_video=False, with_shards=False)
    monkeypatch.setenv("BLIP2_CACHE_ROOT", str(tree))
    annotation = write_equal_length_captions(tree, tmp_path / "ddp_train.json")

    # single-process references (batch 2b), in-process; they also build the tiny LLM assets once
    references, initial = {}, {}
    cases = {"fake": (fake_ddp_config(tmp_path / "single", 8, "one"), fake_ddp_config(tmp_path, 4, "fake_ddp"))}
    fsdp = fake_ddp_config(tmp_path, 4, "fake_fsdp")
    fsdp["run"]["fsdp"] = {"min_num_params": 1}  # shard every layer of the fake model across the 2 ranks
    cases["fsdp"] = (fake_ddp_config(tmp_path / "single", 8, "one"), fsdp)
    for stage in ("stage1", "stage2"):
        cases[stage] = (tiny_ddp_config(tmp_path / "single", stage, 4, f"{stage}_one", annotation),
                        tiny_ddp_config(tmp_path, stage, 2, f"{stage}_ddp", annotation))
    varied = write_varied_length_captions(tree, tmp_path / "ddp_train_varied.json")
    cases["stage2_varied_lengths"] = (tiny_ddp_config(tmp_path / "single", "stage2", 4, "varied_one", varied),
                                      tiny_ddp_config(tmp_path, "stage2", 2, "varied_ddp", varied))
    # sampled ITM negatives: drawn per global sample index, so both layouts pick the same ones
    single, ddp = (tiny_ddp_config(tmp_path / "single", "stage1", 4, "multinomial_one", annotation),
                   tiny_ddp_config(tmp_path, "stage1", 2, "multinomial_ddp", annotation))
    for cfg in (single, ddp):
        cfg["model"]["itm_negatives"] = "multinomial"
    cases["stage1_multinomial"] = (single, ddp)
    for name, (single_cfg, _) in cases.items():
        runner = build_runner(tmp_path / "single" / name, fake_plugin_dir, cfg=single_cfg, job_id=name)
        initial[name] = {k: v.detach().clone() for k, v in runner.raw_model.named_parameters() if v.requires_grad}
        runner.train()
        references[name] = step_weights(runner.job_dir)

    env = subprocess_env(fake_plugin_dir)
    env["BLIP2_CACHE_ROOT"] = str(tree)
    configs = [write_yaml(tmp_path / f"{name}_ddp.yaml", ddp_cfg) for name, (_, ddp_cfg) in cases.items()]
    torchrun(tmp_path, configs, env)

    for name, (_, ddp_cfg) in cases.items():
        job = tmp_path / "out" / ddp_cfg["run"]["job_name"]
        ddp, ref = step_weights(job), references[name]
        assert set(ddp) == set(ref), name
        moved = [k for k in initial[name] if not torch.equal(ref[k], initial[name][k])]
        assert len(moved) > len(initial[name]) // 2, f"{name}: too few parameters moved for a meaningful test"
        worst = max(float((ddp[k] - ref[k]).abs().max()) for k in ref)
        assert worst <= 1e-5, f"{name}: 2 ranks x b vs 1 process x 2b differ by {worst:.2e}"
        log = (job / "log.jsonl").read_text()
        assert log.count('"type": "train_step"') == 1  # one step, logged by rank 0 only
