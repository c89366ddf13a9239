"""Kill a training subprocess with SIGKILL in the middle of an epoch, resume it with
``--resume auto``, and get bitwise the parameters of an uninterrupted run (CPU, fixed seeds).

The fake model has dropout and the fake data augmentation noise from the global RNG, so the
test fails unless optimizer state, LR position, data position and every RNG state are restored.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_runner import (  # noqa: F401  (fixture re-exported)
    REPO_ROOT,
    build_runner,
    fake_config,
    fake_plugin_dir,
    last_json_line,
    run_cli,
    subprocess_env,
    write_yaml,
)


def resume_config(tmp_path: Path, sleep_s: float) -> dict:
    cfg = fake_config(tmp_path, max_epoch=2, save_every_steps=2, keep_last_ckpts=0, job_name="killed",
                      test_splits=[])  # 8 steps per epoch; checkpoints at steps 2, 4, 6 (mid-epoch), 8, ...
    cfg["model"]["sleep_s"] = sleep_s
    return cfg


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_auto_is_bitwise(tmp_path, fake_plugin_dir):
    cfg_path = write_yaml(tmp_path / "resume.yaml", resume_config(tmp_path, sleep_s=0.4))
    env = subprocess_env(fake_plugin_dir)
    job = tmp_path / "out" / "killed"
    args = ["--cfg", str(cfg_path), "--plugins", "runner_fake_plugin"]
    proc = subprocess.Popen([sys.executable, "-m", "runners.train", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not (job / "checkpoints" / "step_00000004").is_dir():
            assert proc.poll() is None, f"training ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
            assert time.time() < deadline, "no mid-epoch checkpoint appeared in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    latest = sorted(p.name for p in (job / "checkpoints").iterdir() if p.name.startswith("step_"))[-1]
    state = torch.load(job / "checkpoints" / latest / "state.pt", weights_only=True)
    assert not state["end_of_epoch"] and state["epoch"] == 0, f"killed too late ({latest}): not mid-epoch"

    proc = run_cli("runners.train", [*args, "--resume", "auto", "--options", "model.sleep_s=0.0"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(last_json_line(proc.stdout)["job_dir"]) == job  # continued in the same job directory
    resumed = load_file(job / "checkpoints" / "step_00000016" / "model.safetensors")
    log = [json.loads(line) for line in (job / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if r["type"] == "train_step"]
    assert steps[-1] == 16 and state["global_step"] + 1 in steps

    # uninterrupted reference, in-process with the subprocess's thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref_cfg = resume_config(tmp_path / "ref", sleep_s=0.0)
        ref_cfg["run"]["job_name"] = "reference"
        reference = build_runner(tmp_path / "ref", fake_plugin_dir, cfg=ref_cfg)
        reference.train()
    finally:
        torch.set_num_threads(threads)
    expected = load_file(reference.job_dir / "checkpoints" / "step_00000016" / "model.safetensors")
    assert set(resumed) == set(expected)
    for k in expected:
        assert torch.equal(resumed[k], expected[k]), f"{k} differs after resume"
    # and the resumed run really differs from a run that ignored the restored RNG/data state
    assert not torch.equal(expected["head.weight"], load_file(
        job / "checkpoints" / "step_00000002" / "model.safetensors")["head.weight"])
