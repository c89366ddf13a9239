"""Fault injection: what clusters do to a run, and bad inputs, each in a subprocess on the tiny fake model.

Every case asserts the exact outcome: where a resume is possible, the final parameters and the
metrics log equal those of one uninterrupted reference run bitwise (CPU, fixed seeds; shared by all
cases); otherwise a named one-line error and no lost or overwritten data.

The reference run: 2 epochs x 8 optimizer steps, a resumable checkpoint every 2 steps (all kept),
validation and the best checkpoint at each epoch end. A kill during a checkpoint write is injected
deterministically through the writer's testing hook (``BLIP2_FAULT_INJECT``), which writes the file up
to the given byte, then SIGKILLs the process (or fails with ENOSPC), leaving the real partial file.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_runner import REPO_ROOT, fake_config, fake_plugin_dir, subprocess_env, write_yaml  # noqa: F401

pytestmark = pytest.mark.faults

FINAL = "step_00000016"
CKPT_FILES = ("model.safetensors", "optimizer.pt", "state.pt", "manifest.json")


# -- helpers ------------------------------------------------------------------------------------------------
def config(root: Path, job: str, **model) -> Path:
    cfg = fake_config(root, max_epoch=2, save_every_steps=2, keep_last_ckpts=0, job_name=job, test_splits=[])
    cfg["model"].update(model)
    return write_yaml(root / f"{job}.yaml", cfg)


def start(cfg: Path, plugin_dir: Path, *args: str, module: str = "runners.train", **env_extra: str):
    env = subprocess_env(plugin_dir)
    env.update(env_extra)
    return subprocess.Popen([sys.executable, "-m", module, "--cfg", str(cfg), "--plugins", "runner_fake_plugin",
                             *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def run(cfg: Path, plugin_dir: Path, *args: str, **kw) -> tuple[int, str]:
    return finish(start(cfg, plugin_dir, *args, **kw))


def log_records(job: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (job / "log.jsonl").read_text().splitlines()]


def logged_steps(job: Path) -> list[int]:
    path = job / "log.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line being written
            continue
        if record["type"] == "train_step":
            steps.append(record["step"])
    return steps


def wait_for_step(proc: subprocess.Popen, job: Path, step: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not any(s >= step for s in logged_steps(job)):
        assert proc.poll() is None, f"run ended early:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"step {step} never logged"
        time.sleep(0.02)


def assert_same_as_reference(job: Path, ref: Path) -> None:
    """Bitwise the reference's final and best weights, and its log record for record (times aside)."""
    for name in (f"checkpoints/{FINAL}", "checkpoint_best"):
        got, want = load_file(job / name / "model.safetensors"), load_file(ref / name / "model.safetensors")
        assert set(got) == set(want)
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}: {key} differs from the uninterrupted run"
    assert log_records(job) == log_records(ref)  # no step logged twice, none missing
    assert not list(job.rglob(".*.tmp*")) and not list(job.rglob(".*.old*"))  # no temporary folder left


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith(("error:", "config error:"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fake_plugin_dir) -> Path:
    root = tmp_path_factory.mktemp("reference")
    code, err = run(config(root, "reference"), fake_plugin_dir)
    assert code == 0, err[-3000:]
    job = root / "out" / "reference"
    assert (job / "checkpoints" / FINAL).is_dir()
    return job


def copy_until(reference: Path, root: Path, job: str, last_step: int) -> Path:
    """The reference job as a run killed after writing checkpoint ``last_step`` would have left it (its log
    still holds the records written after that checkpoint: a resume must not log them twice)."""
    target = root / "out" / job
    shutil.copytree(reference, target)
    for path in (target / "checkpoints").iterdir():
        if int(path.name.split("_")[1]) > last_step:
            shutil.rmtree(path)
    (target / ".lock").unlink()
    return target


# -- checkpoints damaged after they were written -----------------------------------------------------------
@pytest.mark.parametrize("damaged", CKPT_FILES)
def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, fake_plugin_dir, reference, damaged):
    job = copy_until(reference, tmp_path, "job", last_step=6)
    path = job / "checkpoints" / "step_00000006" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, err = run(config(tmp_path, "job"), fake_plugin_dir, "--resume", "auto")
    assert code == 0, err[-3000:]
    skipped = [line for line in err.splitlines() if "--resume auto skipped checkpoint" in line]
    assert len(skipped) == 1 and f"step_00000006: {damaged}" in skipped[0], err[-3000:]
    assert "continuing from" in err and "step_00000004" in err
    assert_same_as_reference(job, reference)


def test_loading_a_damaged_checkpoint_names_file_and_checkpoint(tmp_path):
    from runners import checkpointing as ckpt

    directory = ckpt.save_checkpoint(tmp_path / "step_00000002", {"w": torch.ones(3)}, {"state": {}},
                                     {"global_step": 2})
    data = bytearray((directory / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    (directory / "optimizer.pt").write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000002: optimizer.pt does not match its sha256"):
        ckpt.load_checkpoint_state(directory)


# -- killed or out of space while writing a checkpoint ---------------------------------------------------------
def _offsets(reference: Path, name: str) -> list[int]:
    size = (reference / "checkpoints" / "step_00000006" / name).stat().st_size
    return [0, size // 2, size - 1]


@pytest.mark.parametrize("name", CKPT_FILES)
def test_sigkill_while_writing_each_checkpoint_file(tmp_path, fake_plugin_dir, reference, name):
    """Killed at byte 0, the middle and the last byte of every file: the partial checkpoint is never
    published, the next run removes it and resumes from the previous one, bitwise."""
    offsets = _offsets(reference, name)
    for i, offset in enumerate(offsets):
        job = tmp_path / "out" / f"kill{i}"
        code, err = run(config(tmp_path, f"kill{i}"), fake_plugin_dir,
                        BLIP2_FAULT_INJECT=f"step_00000006/{name}:{offset}:kill")
        assert code == -signal.SIGKILL, err[-3000:]
        temps = list((job / "checkpoints").glob(".step_00000006.tmp*"))
        assert len(temps) == 1 and (temps[0] / name).stat().st_size == offset
        assert not (job / "checkpoints" / "step_00000006").exists()
        assert sorted(p.name for p in (job / "checkpoints").iterdir() if not p.name.startswith(".")) == \
            ["step_00000002", "step_00000004"]
    job = tmp_path / "out" / "kill1"  # one resume per file (every kill above left the same state)
    code, err = run(config(tmp_path, "kill1"), fake_plugin_dir, "--resume", "auto")
    assert code == 0, err[-3000:]
    assert "removed the unfinished" in err and ".step_00000006.tmp" in err
    assert_same_as_reference(job, reference)


def test_disk_full_while_writing_a_checkpoint(tmp_path, fake_plugin_dir, reference):
    job = tmp_path / "out" / "full"
    code, err = run(config(tmp_path, "full"), fake_plugin_dir,
                    BLIP2_FAULT_INJECT="step_00000006/optimizer.pt:1000:enospc")
    assert code == 1
    (line,) = error_lines(err)
    assert line.startswith(f"error: cannot write checkpoint {job / 'checkpoints' / 'step_00000006'}: "
                           f"no space left on device: ") and line.endswith("optimizer.pt (the partial checkpoint "
                                                                           "was removed)")
    assert not list(job.rglob(".*.tmp*"))  # nothing left behind
    code, err = run(config(tmp_path, "full"), fake_plugin_dir, "--resume", "auto")
    assert code == 0, err[-3000:]
    assert_same_as_reference(job, reference)


# -- signals -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_stop_signal_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, fake_plugin_dir, reference,
                                                                      signame):
    from runners.cli import EXIT_PREEMPTED

    job = tmp_path / "out" / "job"
    proc = start(config(tmp_path, "job", sleep_s=0.25), fake_plugin_dir)
    wait_for_step(proc, job, 3)
    proc.send_signal(getattr(signal, signame))  # mid-step: the model sleeps inside forward
    code, err = finish(proc)
    assert code == EXIT_PREEMPTED, err[-3000:]
    stopped = max(logged_steps(job))
    assert f"stopped by {signame} after optimizer step {stopped}" in err
    assert (job / "checkpoints" / f"step_{stopped:08d}" / "manifest.json").is_file()
    code, err = run(config(tmp_path, "job"), fake_plugin_dir, "--resume", "auto")
    assert code == 0, err[-3000:]
    assert_same_as_reference(job, reference)


def test_second_sigint_aborts_at_once(tmp_path, fake_plugin_dir, reference):
    job = tmp_path / "out" / "job"
    proc = start(config(tmp_path, "job", sleep_s=0.5), fake_plugin_dir)
    wait_for_step(proc, job, 3)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert code in (-signal.SIGINT, 130, 1) and "KeyboardInterrupt" in err
    code, err = run(config(tmp_path, "job"), fake_plugin_dir, "--resume", "auto")
    assert code == 0, err[-3000:]
    assert_same_as_reference(job, reference)


def test_sigkill_between_checkpoints_logs_each_step_once(tmp_path, fake_plugin_dir, reference):
    job = tmp_path / "out" / "job"
    proc = start(config(tmp_path, "job", sleep_s=0.25), fake_plugin_dir)
    wait_for_step(proc, job, 7)  # checkpoint 6 is written; step 7 is in the log only
    proc.kill()
    finish(proc)
    assert 7 in logged_steps(job) and not (job / "checkpoints" / "step_00000008").exists()
    code, err = run(config(tmp_path, "job"), fake_plugin_dir, "--resume", "auto")
    assert code == 0, err[-3000:]
    assert_same_as_reference(job, reference)


# -- one job folder, one run ---------------------------------------------------------------------------------
def test_same_job_name_twice_is_refused_naming_the_running_one(tmp_path, fake_plugin_dir, reference):
    """Three runs of one job name started 0.5 s apart (the third with --resume auto): exactly one claims the
    folder; the others are refused naming it, and its results equal the reference."""
    job = tmp_path / "out" / "job"
    cfg = config(tmp_path, "job", sleep_s=0.3)
    procs = [start(cfg, fake_plugin_dir)]
    time.sleep(0.5)
    procs.append(start(cfg, fake_plugin_dir))
    procs.append(start(cfg, fake_plugin_dir, "--resume", "auto"))
    results = [finish(p) for p in procs]
    winners = [p for p, (code, _) in zip(procs, results) if code == 0]
    assert len(winners) == 1, [r[1][-2000:] for r in results]
    for proc, (code, err) in zip(procs, results):
        if proc is not winners[0]:
            assert code == 1
            (line,) = error_lines(err)
            assert f"job directory {job}" in line and f"in use by another run (pid {winners[0].pid} on " in line
    assert_same_as_reference(job, reference)  # nothing interleaved or overwritten


def test_output_folder_not_writable_fails_before_anything_is_built(tmp_path, fake_plugin_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = fake_config(tmp_path, job_name="job")
    cfg["run"]["output_dir"] = str(blocker / "out")
    code, err = run(write_yaml(tmp_path / "job.yaml", cfg), fake_plugin_dir)
    assert code == 1
    (line,) = error_lines(err)
    assert line == f"error: cannot create the job directory: not a directory: {blocker / 'out'}"
    assert "trainable parameters" not in err  # the model was never built


def test_free_space_is_checked_against_a_checkpoint(tmp_path, fake_plugin_dir, monkeypatch):
    from runners import cli, runner_base
    from runners.run_logging import JobClaimError
    from tests.test_runner import build_runner

    runner = build_runner(tmp_path, fake_plugin_dir, max_epoch=1)
    usage = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(runner_base.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(JobClaimError, match=r"not enough free space for a checkpoint in .*: 0.0 MiB free"):
        runner.train()
    assert not (runner.job_dir / "checkpoints").exists()
    done = build_runner(tmp_path / "b", fake_plugin_dir, max_epoch=1, save_every_steps=2)
    monkeypatch.undo()
    done.train()
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(JobClaimError, match="the last checkpoint .* took"):
        cli._check_free_space(done.job_dir, done.job_dir / "checkpoints" / "step_00000008")


# -- files that are not checkpoints -------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_non_checkpoint_files_are_named_and_never_unpickled(tmp_path, fake_plugin_dir):
    cfg = fake_config(tmp_path, job_name="eval")
    cfg_path = write_yaml(tmp_path / "eval.yaml", cfg)
    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps({"lr": 1e-4}))
    marker = tmp_path / "code_ran"
    torch.save({"model": {"w": torch.ones(2)}, "extra": _Evil(str(marker))}, tmp_path / "evil.pth")
    code, err = run(cfg_path, fake_plugin_dir, "--checkpoint", str(notes), module="runners.evaluate")
    assert code == 1 and error_lines(err) == [f"error: not a checkpoint: {notes} (JSON text)"]
    assert "weights_only=False" not in err and not (tmp_path / "out").exists()
    code, err = run(cfg_path, fake_plugin_dir, "--checkpoint", str(tmp_path / "evil.pth"), module="runners.evaluate")
    assert code == 1 and not marker.exists()
    (line,) = error_lines(err)
    assert "evil.pth holds Python objects that loading safely refuses" in line and "weights_only=False" not in err


# -- bad inputs: refused before anything exists ----------------------------------------------------------------
def _stage1_yaml(root: Path, **extra) -> dict:
    cfg = {"model": {"arch": "blip2", "model_type": "tiny"},
           "datasets": {"coco_caption": {}},
           "run": {"task": "image_text_pretrain", "runner": "runner_iter", "max_iters": 1, "iters_per_inner_epoch": 1,
                   "init_lr": 1e-4, "batch_size_train": 2, "output_dir": str(root / "out"), "job_name": "job"}}
    for dotted, value in extra.items():
        node = cfg
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return cfg


BAD_INPUTS = {
    "run_itm_negatives": (lambda root: _stage1_yaml(root, run__itm_negatives="hardest"),
                          "run.itm_negatives (from {cfg}) is not read by anything here: the ITM negatives are a "
                          "model option: set model.itm_negatives (multinomial | hardest)"),
    "model_itm_negatives": (lambda root: _stage1_yaml(root, model__itm_negatives="random"),
                            "model.itm_negatives (from {cfg}) must be one of multinomial, hardest, got 'random'"),
    "negative_batch": (lambda root: _stage1_yaml(root, run__batch_size_train=-1),
                       "run.batch_size_train (from {cfg}) must be >= 1 (per-process training batch size), got -1"),
    "qformer_typo": (lambda root: _stage1_yaml(root, model__qformer_config={"hiden_size": 32}),
                     "unknown key 'model.qformer_config.hiden_size' (from {cfg}). Did you mean: hidden_size"),
    "null_split_in_use": (lambda root: _stage1_yaml(root, datasets__coco_caption__build_info__annotations__val=None,
                                                    run__valid_splits=["val"]),
                          "datasets.coco_caption.build_info.annotations.val (from {cfg}) is null, which switches "
                          "that split off, but run.valid_splits uses it"),
    "null_batch": (lambda root: _stage1_yaml(root, run__batch_size_train=None),
                   "run.batch_size_train (from {cfg}) is null; it must be int"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_before_anything_is_built(tmp_path, fake_plugin_dir, case):
    make, message = BAD_INPUTS[case]
    cfg = write_yaml(tmp_path / "bad.yaml", make(tmp_path))
    code, err = run(cfg, fake_plugin_dir)
    assert code == 2, err[-3000:]
    assert message.format(cfg=cfg) in err, err[-3000:]
    assert not (tmp_path / "out").exists()  # no job folder: the same job name can be used again


def test_a_refused_value_leaves_the_job_name_free(tmp_path, fake_plugin_dir):
    cfg = fake_config(tmp_path, job_name="job", max_epoch=1, valid_splits=[])
    cfg["run"]["batch_size_train"] = -1
    code, _ = run(write_yaml(tmp_path / "job.yaml", cfg), fake_plugin_dir)
    assert code == 2
    cfg["run"]["batch_size_train"] = 4
    code, err = run(write_yaml(tmp_path / "job.yaml", cfg), fake_plugin_dir)
    assert code == 0, err[-3000:]


def test_null_split_that_no_run_key_uses_is_switched_off():
    import registry
    from omegaconf import OmegaConf

    node = OmegaConf.create({"build_info": {"annotations": {"train": {"storage": "a.json"}, "val": None,
                                                            "test": {"storage": "c.json"}}}})
    assert registry.builders.get("coco_caption")(node).splits() == ["train", "test"]


# -- tiny BLIP-2: a damaged feature cache, a truncated image in the evaluation set ------------------------------
def _tiny_blip2(root: Path, tree: Path, job: str, cache: Path, **dataset) -> Path:
    """Stage 1 retrieval fine-tuning, 4 steps over 4 training images (2 data epochs: the second reads the
    frozen-feature cache), retrieval validation on 2 images at the end; deterministic preprocessing, as the
    cache requires."""
    cfg = _stage1_yaml(root)
    cfg["model"]["qformer_config"] = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    cfg["run"]["task"] = "retrieval"  # its validation (ITC + ITM re-ranking) reads the eval images
    cfg["run"]["k_test"] = 2
    del cfg["datasets"]["coco_caption"]
    cfg["datasets"]["coco_retrieval"] = {
        "cache_root": str(tree),
        "vis_processor": {"train": {"name": "blip_image_eval", "image_size": 64},
                          "eval": {"name": "blip_image_eval", "image_size": 64}},
        "build_info": {"annotations": {"test": None}}, **dataset}
    cfg["run"].update(job_name=job, max_iters=4, iters_per_inner_epoch=4, valid_splits=["val"], batch_size_eval=2,
                      cache_image_features=True, feature_cache_dir=str(cache), lr_sched="constant_lr", seed=5)
    return write_yaml(root / f"{job}.yaml", cfg)


def _final(job: Path) -> dict[str, torch.Tensor]:
    return load_file(job / "checkpoints" / "step_00000004" / "model.safetensors")


def _assert_equal_weights(got: dict, want: dict) -> None:
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def blip2_reference(tmp_path_factory, fake_plugin_dir):
    from tests.fixtures_data import make_lavis_tree

    root = tmp_path_factory.mktemp("blip2")
    tree = root / "tree"
    paths = make_lavis_tree(tree, with_video=False, with_shards=False)
    code, err = run(_tiny_blip2(root, tree, "reference", root / "cache"), fake_plugin_dir)
    assert code == 0, err[-3000:]
    bad_image = tree / "coco" / "images" / paths["coco_val_images"][0]
    return {"root": root, "tree": tree, "cache": root / "cache", "bad_image": bad_image,
            "weights": _final(root / "out" / "reference")}


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_damaged_feature_cache_chunk_is_recomputed(tmp_path, fake_plugin_dir, blip2_reference, damage):
    ref = blip2_reference
    cache = tmp_path / "cache"
    shutil.copytree(ref["cache"], cache)
    (chunk,) = cache.glob("*/rank0/chunk00000.npy")
    data = bytearray(chunk.read_bytes())
    if damage == "truncated":
        chunk.write_bytes(bytes(data[:4000]))  # cut inside the second stored row
    else:  # same size, bytes changed inside the first stored rows
        data[256:4096] = bytes(b ^ 0x5A for b in data[256:4096])
        chunk.write_bytes(bytes(data))
    code, err = run(_tiny_blip2(tmp_path, ref["tree"], "job", cache), fake_plugin_dir)
    assert code == 0, err[-3000:]
    assert ("chunk00000.npy is damaged" if damage == "truncated" else "does not match its digest") in err
    _assert_equal_weights(_final(tmp_path / "out" / "job"), ref["weights"])


def test_truncated_image_in_the_evaluation_set(tmp_path, fake_plugin_dir, blip2_reference):
    """Policy ``error``: a one-line error naming the file, the training saved first; after the file is
    fixed, --resume auto only repeats the validation. Policy ``skip`` (default): a warning naming it."""
    from tests.fixtures_data import write_corrupt_image

    ref = blip2_reference
    tree = tmp_path / "tree"
    shutil.copytree(ref["tree"], tree)
    bad = tree / ref["bad_image"].relative_to(ref["tree"])
    good_bytes = bad.read_bytes()
    write_corrupt_image(bad, "truncated")
    code, err = run(_tiny_blip2(tmp_path, tree, "skip", tmp_path / "cache_skip"), fake_plugin_dir)
    assert code == 0, err[-3000:]
    assert f"skipped unreadable media (cannot read {bad}" in err
    _assert_equal_weights(_final(tmp_path / "out" / "skip"), ref["weights"])

    cfg = _tiny_blip2(tmp_path, tree, "strict", tmp_path / "cache_strict", bad_media_policy="error")
    code, err = run(cfg, fake_plugin_dir)
    assert code == 1
    (line,) = error_lines(err)
    assert line.startswith(f"error: cannot read {bad}: ") and "truncated" in line
    job = tmp_path / "out" / "strict"
    assert (job / "checkpoints" / "step_00000004" / "manifest.json").is_file()  # the training is not lost
    bad.write_bytes(good_bytes)
    code, err = run(cfg, fake_plugin_dir, "--resume", "auto")
    assert code == 0, err[-3000:]
    _assert_equal_weights(_final(job), ref["weights"])
    assert [r["type"] for r in log_records(job)].count("train_epoch") == 1
