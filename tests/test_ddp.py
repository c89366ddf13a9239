"""DDP on CPU (gloo): one optimizer step on 2 ranks x batch b equals one process with batch 2b.

One ``torchrun --nproc_per_node=2`` launch runs a small driver that trains several configs in
turn through ``runners.cli.run`` (each run initialises and destroys its own process group); the
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

DRIVER = """
import sys
from runners.cli import run
for cfg in sys.argv[1:]:
    run(["--cfg", cfg, "--plugins", "runner_fake_plugin"], training=True)
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
                      job_name=name, init_lr=0.05, warmup_steps=0, warmup_lr=-1)
    cfg["model"]["dropout"] = 0.0
    cfg["datasets"]["fake_regression"].update(num_samples=8, noise=0.0)
    return cfg


def step_weights(job_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(job_dir / "checkpoints" / "step_00000001" / "model.safetensors")


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process_double_batch(tmp_path, fake_plugin_dir):
    ddp_cfg = write_yaml(tmp_path / "fake_ddp.yaml", fake_ddp_config(tmp_path, 4, "fake_ddp"))
    torchrun(tmp_path, [ddp_cfg], subprocess_env(fake_plugin_dir))
    ddp = step_weights(tmp_path / "out" / "fake_ddp")

    single = build_runner(tmp_path / "single", fake_plugin_dir, cfg=fake_ddp_config(tmp_path / "single", 8, "one"))
    initial = {k: v.clone() for k, v in single.raw_model.state_dict().items()}
    single.train()
    ref = step_weights(single.job_dir)
    assert set(ddp) == set(ref)
    for k in ref:
        assert not torch.equal(ref[k], initial[k]), f"{k} did not move: the comparison would be vacuous"
        torch.testing.assert_close(ddp[k], ref[k], atol=1e-5, rtol=0)
    log = (tmp_path / "out" / "fake_ddp" / "log.jsonl").read_text()
    assert '"type": "train_step"' in log  # written once, by rank 0 only
    assert log.count('"type": "train_step"') == 1
