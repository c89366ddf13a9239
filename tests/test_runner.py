"""Runner loop, checkpoints and CLIs.

Fast in-process tests use a small fake model/task/builder registered by a plugin module written
to a temp dir (``FAKE_PLUGIN``): it has a frozen part, dropout and augmentation noise, so RNG
handling, freezing and resume are exercised for real. The end-to-end CLI tests (marked slow) run
``python -m runners.train`` / ``runners.evaluate`` as subprocesses.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]

FAKE_PLUGIN = textwrap.dedent('''
    """Fake model/task/builder for runner tests (a regression problem with a frozen encoder)."""
    import torch
    import registry
    from torch.utils.data import Dataset


    class FakeRegressionDataset(Dataset):
        def __init__(self, n, dim, seed, noise):
            g = torch.Generator().manual_seed(seed)
            self.x = torch.randn(n, dim, generator=g)
            self.y = torch.tanh(self.x @ torch.randn(dim, 2, generator=g))
            self.noise = noise

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            x = self.x[i]
            if self.noise:  # augmentation drawn from the global RNG (restored on resume)
                x = x + self.noise * torch.randn_like(x)
            return {"image": x, "target": self.y[i], "instance_id": str(i)}

        def collater(self, batch):
            return {"image": torch.stack([b["image"] for b in batch]),
                    "target": torch.stack([b["target"] for b in batch]),
                    "instance_id": [b["instance_id"] for b in batch]}


    @registry.builders.register("fake_regression", override=True)
    class FakeBuilder:
        DATASET_CONFIG_DICT = {}
        EXTRA_CONFIG_KEYS = ("num_samples", "dim", "seed", "noise")

        def __init__(self, cfg):
            self.cfg = cfg

        def build_datasets(self):
            c = self.cfg
            n, dim = int(c.get("num_samples", 32)), int(c.get("dim", 8))
            return {"train": FakeRegressionDataset(n, dim, int(c.get("seed", 0)), float(c.get("noise", 0.1))),
                    "val": FakeRegressionDataset(16, dim, int(c.get("seed", 0)) + 1, 0.0),
                    "test": FakeRegressionDataset(16, dim, int(c.get("seed", 0)) + 2, 0.0)}


    @registry.models.register("fake_regressor", override=True)
    class FakeRegressor(torch.nn.Module):
        PRETRAINED_MODEL_CONFIG_DICT = {}

        def __init__(self, dim=8, hidden=16, dropout=0.1, nan_at_step=-1, sleep_s=0.0):
            super().__init__()
            self.encoder = torch.nn.Linear(dim, hidden)  # frozen, like the ViT / LLM
            self.encoder.requires_grad_(False)
            self.proj = torch.nn.Linear(hidden, hidden)
            self.norm = torch.nn.LayerNorm(hidden)
            self.head = torch.nn.Linear(hidden, 2)
            self.dropout = torch.nn.Dropout(dropout)
            self.nan_at_step = nan_at_step
            self.sleep_s = sleep_s  # slows training down so a test can kill it mid-epoch

        @classmethod
        def from_config(cls, cfg):
            return cls(int(cfg.get("dim", 8)), int(cfg.get("hidden", 16)), float(cfg.get("dropout", 0.1)),
                       int(cfg.get("nan_at_step", -1)), float(cfg.get("sleep_s", 0.0)))

        def forward(self, samples):
            if self.sleep_s and self.training:
                import time
                time.sleep(self.sleep_s)
            with torch.no_grad():
                h = self.encoder(samples["image"])
            out = self.head(self.norm(self.dropout(torch.nn.functional.gelu(self.proj(h)))))
            loss = torch.nn.functional.mse_loss(out.float(), samples["target"].float())
            if samples.get("iters") == self.nan_at_step:
                loss = loss * float("nan")
            return {"loss": loss, "loss_mse": loss.detach()}

        def trainable_state_dict(self):
            return {n: p for n, p in self.named_parameters() if p.requires_grad}

        def get_optimizer_params(self, weight_decay, lr_layer_decay):
            # proj is the "lower layer": its LR is scaled by lr_layer_decay
            return [
                {"params": [self.proj.weight], "weight_decay": weight_decay, "lr_scale": lr_layer_decay},
                {"params": [self.head.weight], "weight_decay": weight_decay, "lr_scale": 1.0},
                {"params": [self.proj.bias, self.head.bias, self.norm.weight, self.norm.bias],
                 "weight_decay": 0.0, "lr_scale": 1.0},
            ]


    @registry.tasks.register("fake_regression_task", override=True)
    class FakeTask:
        def __init__(self, cfg):
            self.cfg = cfg

        @classmethod
        def setup_task(cls, cfg):
            return cls(cfg)

        def build_datasets(self, cfg):
            return {name: registry.builders.get(name)(node).build_datasets() for name, node in cfg.datasets.items()}

        def build_model(self, cfg):
            return registry.models.get(cfg.model.arch).from_config(cfg.model)

        def train_step(self, model, samples):
            out = model(samples)
            return out["loss"], {"loss_mse": float(out["loss_mse"])}

        @torch.no_grad()
        def evaluation(self, model, loader):
            sse, count = torch.zeros((), dtype=torch.float64), 0
            for samples in loader:
                device = next(model.parameters()).device
                pred = model.head(model.norm(torch.nn.functional.gelu(model.proj(model.encoder(
                    samples["image"].to(device))))))
                sse += ((pred.float() - samples["target"].to(device)) ** 2).sum().double().cpu()
                count += samples["target"].numel()
            stats = torch.tensor([float(sse), float(count)], dtype=torch.float64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(stats)
            return stats

        def after_evaluation(self, results, split, epoch):
            mse = float(results[0] / results[1])
            return {"mse": mse, "agg_metrics": -mse, "num_values": int(results[1])}
''')

FAKE_YAML = {
    "model": {"arch": "fake_regressor", "dim": 8, "hidden": 16, "dropout": 0.1},
    "datasets": {"fake_regression": {"num_samples": 32, "dim": 8, "seed": 3, "noise": 0.1}},
    "run": {
        "task": "fake_regression_task", "lr_sched": "linear_warmup_cosine_lr", "init_lr": 1e-2, "min_lr": 1e-4,
        "warmup_lr": 1e-3, "warmup_steps": 2, "weight_decay": 0.05, "beta2": 0.98, "max_epoch": 3,
        "batch_size_train": 4, "batch_size_eval": 8, "num_workers": 0, "seed": 7, "device": "cpu",
        "amp": "off", "train_splits": ["train"], "valid_splits": ["val"], "test_splits": ["test"],
        "log_freq": 1,
    },
}


@pytest.fixture(scope="session")
def fake_plugin_dir(tmp_path_factory) -> Path:
    """Directory holding ``runner_fake_plugin.py``, importable in-process and by subprocesses."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "runner_fake_plugin.py").write_text(FAKE_PLUGIN)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def write_yaml(path: Path, cfg: dict) -> Path:
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


def fake_config(tmp_path: Path, **run_overrides) -> dict:
    cfg = json.loads(json.dumps(FAKE_YAML))
    cfg["run"]["output_dir"] = str(tmp_path / "out")
    cfg["run"].update(run_overrides)
    return cfg


def subprocess_env(*extra_paths: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *map(str, extra_paths), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    return env


def run_cli(module: str, args: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc


def last_json_line(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON summary on stdout:\n{stdout}"
    return json.loads(lines[-1])


def read_log(job_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (job_dir / "log.jsonl").read_text().splitlines()]


def build_runner(tmp_path: Path, fake_plugin_dir: Path, resume_from=None, job_id="job", cfg: dict | None = None,
                 plugins=("runner_fake_plugin",), **run_overrides):
    """Config -> task -> datasets -> model -> runner, in-process (as runners.cli does); ``cfg`` replaces
    the fake config."""
    from runners.cli import build_runner as cli_build_runner
    from runners.config import Config

    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg_path = write_yaml(tmp_path / "cfg.yaml", cfg or fake_config(tmp_path, **run_overrides))
    return cli_build_runner(Config(cfg_path, plugins=list(plugins)), job_id, resume_from=resume_from)


# -- in-process tests -----------------------------------------------------------------------------
def test_optimizer_groups_decay_lr_scale_and_frozen(tmp_path, fake_plugin_dir):
    from runners.optim import build_optimizer, default_param_groups

    runner = build_runner(tmp_path, fake_plugin_dir, lr_layer_decay=0.5)
    model = runner.raw_model
    opt = build_optimizer(model, runner.run_cfg)
    assert opt.defaults["betas"] == (0.9, 0.98)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.encoder.weight) not in in_opt and id(model.encoder.bias) not in in_opt
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    scales = {id(p): g.get("lr_scale", 1.0) for g in opt.param_groups for p in g["params"]}
    assert scales[id(model.proj.weight)] == 0.5 and scales[id(model.head.weight)] == 1.0
    # default grouping (models without get_optimizer_params): no decay on biases, norms and 1-d params
    decay, no_decay = default_param_groups(model, 0.05)
    assert {id(p) for p in decay["params"]} == {id(model.proj.weight), id(model.head.weight)}
    assert id(model.norm.weight) in {id(p) for p in no_decay["params"]} and no_decay["weight_decay"] == 0.0


def test_lr_scales_multiply_the_lr_of_parameters_under_a_prefix(tmp_path, fake_plugin_dir):
    """``run.lr_scales`` {prefix: factor} multiplies the LR of the parameters under each prefix (whole name
    components), on top of the layer-wise decay; the scheduler's LR reaches each group times its scale."""
    from runners.optim import build_optimizer

    runner = build_runner(tmp_path, fake_plugin_dir, lr_layer_decay=0.5, lr_scales={"proj": 0.1, "head": 0.0})
    model = runner.raw_model
    opt = build_optimizer(model, runner.run_cfg)
    scales = {id(p): g.get("lr_scale", 1.0) for g in opt.param_groups for p in g["params"]}
    assert scales[id(model.proj.weight)] == pytest.approx(0.05)  # 0.5 (layer decay) x 0.1
    assert scales[id(model.proj.bias)] == pytest.approx(0.1) and scales[id(model.head.weight)] == 0.0
    assert scales[id(model.norm.weight)] == 1.0
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad}
    from runners.lr_schedulers import LinearWarmupCosineLR

    LinearWarmupCosineLR(opt, init_lr=1e-3, total_steps=10).step(0)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(model.proj.weight)] == pytest.approx(5e-5) and lrs[id(model.norm.weight)] == pytest.approx(1e-3)
    assert lrs[id(model.head.weight)] == 0.0


@pytest.mark.parametrize("lr_scales, message", [
    ({"pro": 0.1}, "'pro' names no trainable parameter; trainable parameters are under head, norm, proj"),
    ({"encoder": 0.1}, "'encoder' names no trainable parameter"),  # frozen
    ({"proj": -1}, "run.lr_scales.proj: the LR factor must be a number >= 0, got -1"),
])
def test_lr_scales_refuses_unknown_prefixes_and_negative_factors(tmp_path, fake_plugin_dir, lr_scales, message):
    from runners.optim import build_optimizer

    runner = build_runner(tmp_path, fake_plugin_dir, lr_scales=lr_scales)
    with pytest.raises(ValueError) as err:
        build_optimizer(runner.raw_model, runner.run_cfg)
    assert message in str(err.value)


def test_fused_adamw_equals_the_reference_update(tmp_path, fake_plugin_dir):
    """The runner's AdamW is the fused kernel on CPU; three steps match PyTorch's single-tensor loop to 1e-6."""
    from runners.optim import build_optimizer

    runner = build_runner(tmp_path, fake_plugin_dir, weight_decay=0.05)
    model = runner.raw_model
    opt = build_optimizer(model, runner.run_cfg)
    assert opt.defaults["fused"] is True
    groups = [{**g, "params": [p.detach().clone().requires_grad_() for p in g["params"]]} for g in opt.param_groups]
    ref = torch.optim.AdamW(groups, foreach=False, fused=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for group, ref_group in zip(opt.param_groups, ref.param_groups):
            for p, q in zip(group["params"], ref_group["params"]):
                p.grad = torch.randn(p.shape, generator=gen)
                q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for group, ref_group in zip(opt.param_groups, ref.param_groups):
        for p, q in zip(group["params"], ref_group["params"]):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6)


def test_train_logs_checkpoints_best_and_test(tmp_path, fake_plugin_dir):
    from safetensors.torch import load_file

    runner = build_runner(tmp_path, fake_plugin_dir, lr_layer_decay=0.5)
    frozen_before = runner.raw_model.encoder.weight.clone()
    results = runner.train()
    job = runner.job_dir
    assert job == tmp_path / "out" / "job"
    log = read_log(job)
    steps = [r for r in log if r["type"] == "train_step"]
    assert [r["step"] for r in steps] == list(range(1, 25))  # 32 samples / batch 4 = 8 steps x 3 epochs
    assert steps[0]["lr"] == pytest.approx(1e-3) and steps[2]["lr"] == pytest.approx(1e-2)
    assert steps[-1]["lr"] < steps[3]["lr"]
    evals = [r for r in log if r["type"] == "eval"]
    assert [r["split"] for r in evals] == ["val", "val", "val", "test"]
    assert all(r["num_values"] == 32 for r in evals)
    train_epochs = [r["loss"] for r in log if r["type"] == "train_epoch"]
    assert train_epochs[-1] < train_epochs[0]
    # best checkpoint = the epoch with the highest agg_metrics on val; test ran with it
    best_epoch = max(range(3), key=lambda e: evals[e]["agg_metrics"])
    assert results["best_epoch"] == best_epoch
    best = load_file(job / "checkpoint_best" / "model.safetensors")
    assert set(best) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert torch.equal(runner.raw_model.head.weight, best["head.weight"])  # test used the best weights
    assert "test" in results and results["test"]["agg_metrics"] == evals[-1]["agg_metrics"]
    # resumable checkpoints: only the last 2 kept, each complete
    ckpts = sorted(p.name for p in (job / "checkpoints").iterdir())
    assert ckpts == ["step_00000016", "step_00000024"]
    for name in ("model.safetensors", "optimizer.pt", "state.pt"):
        assert (job / "checkpoints" / "step_00000024" / name).is_file()
    state = torch.load(job / "checkpoints" / "step_00000024" / "state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["global_step"] == 24 and state["end_of_epoch"]
    assert len(state["rng"]) == 1 and state["data"] == {"data_epoch": 2, "batch_in_epoch": 8}
    assert OmegaConf.load(job / "config.yaml").run.task == "fake_regression_task"
    assert torch.equal(runner.raw_model.encoder.weight, frozen_before)  # frozen stays frozen


def test_lr_scale_reaches_param_groups(tmp_path, fake_plugin_dir):
    runner = build_runner(tmp_path, fake_plugin_dir, lr_layer_decay=0.25, max_epoch=1)
    runner.train()
    groups = runner.optimizer.param_groups
    assert groups[0]["lr"] == pytest.approx(0.25 * groups[1]["lr"])


def test_nonfinite_loss_stops_with_step_number(tmp_path, fake_plugin_dir):
    from runners.runner_base import NonFiniteLossError

    runner = build_runner(tmp_path, fake_plugin_dir, valid_splits=[], test_splits=[])
    runner.raw_model.nan_at_step = 5
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 5 \(epoch 0"):
        runner.train()
    assert runner.global_step == 5
    assert torch.isfinite(runner.raw_model.head.weight).all()


def test_gradient_accumulation_matches_large_batch(tmp_path, fake_plugin_dir):
    """2 micro-batches of 4 accumulate to the gradient of one batch of 8 (dropout off, no noise)."""
    def trained(**kw):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        runner = build_runner(d, fake_plugin_dir, max_epoch=1, valid_splits=[], test_splits=[], **kw)
        runner.raw_model.dropout.p = 0.0
        for ds in runner.datasets["fake_regression"].values():
            ds.noise = 0.0
        runner.train()
        return runner.raw_model.state_dict()

    accum = trained(batch_size_train=4, accum_grad_iters=2)
    big = trained(batch_size_train=8, accum_grad_iters=1)
    for k in big:
        torch.testing.assert_close(accum[k], big[k], atol=1e-6, rtol=1e-5)


def test_bf16_autocast_and_grad_clip_on_cpu(tmp_path, fake_plugin_dir):
    runner = build_runner(tmp_path, fake_plugin_dir, amp="bf16", grad_clip=0.01, max_epoch=1, test_splits=[])
    assert runner.amp_dtype == torch.bfloat16
    runner.train()
    steps = [r for r in read_log(runner.job_dir) if r["type"] == "train_step"]
    assert all(r["grad_norm"] > 0 for r in steps) and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)


def test_fp16_amp_on_cpu_computes_in_fp32(tmp_path, fake_plugin_dir, caplog):
    with caplog.at_level("WARNING"):
        runner = build_runner(tmp_path, fake_plugin_dir, amp="fp16")
    assert runner.amp_dtype is None and "fp16 without CUDA" in caplog.text
    with pytest.raises(ValueError, match="bf16, fp16, off"):
        build_runner(tmp_path, fake_plugin_dir, amp="fp8")


def test_runner_iter_counts_iterations(tmp_path, fake_plugin_dir):
    runner = build_runner(tmp_path, fake_plugin_dir, runner="runner_iter", max_iters=11, iters_per_inner_epoch=5,
                          save_every_steps=3, keep_last_ckpts=0)
    runner.train()
    log = read_log(runner.job_dir)
    assert [r["step"] for r in log if r["type"] == "train_step"] == list(range(1, 12))
    assert sum(r["type"] == "eval" and r["split"] == "val" for r in log) == 3  # inner epochs 0, 1, 2
    names = sorted(p.name for p in (runner.job_dir / "checkpoints").iterdir())
    assert names == ["step_00000003", "step_00000005", "step_00000006", "step_00000009", "step_00000010",
                     "step_00000011"]
    state = torch.load(runner.job_dir / "checkpoints" / "step_00000011" / "state.pt", weights_only=True)
    assert state["data"] == {"data_epoch": 1, "batch_in_epoch": 3}  # 8 batches per data epoch


def test_resume_in_process_is_bitwise(tmp_path, fake_plugin_dir):
    """Stop after a mid-epoch checkpoint, resume from it: same weights as the uninterrupted run."""
    full = build_runner(tmp_path / "a", fake_plugin_dir, save_every_steps=3, keep_last_ckpts=0, test_splits=[])
    full.train()
    resumed = build_runner(tmp_path / "b", fake_plugin_dir, test_splits=[],
                           resume_from=full.job_dir / "checkpoints" / "step_00000009")
    resumed.train()
    for k, v in full.raw_model.state_dict().items():
        assert torch.equal(v, resumed.raw_model.state_dict()[k]), k
    assert resumed.best_epoch == full.best_epoch


def test_config_error_stops_before_build(tmp_path, fake_plugin_dir):
    from runners.cli import run

    cfg = fake_config(tmp_path)
    cfg["run"]["init_lrr"] = 1.0
    path = write_yaml(tmp_path / "bad.yaml", cfg)
    with pytest.raises(SystemExit) as err:
        run(["--cfg", str(path), "--plugins", "runner_fake_plugin"], training=True)
    assert err.value.code == 2
    assert not (tmp_path / "out").exists()  # nothing was built or written


def test_job_ids_unique():
    from runners.run_logging import new_job_id

    assert len({new_job_id() for _ in range(50)}) == 50


def test_checkpoint_save_is_atomic_and_latest_ignores_partial(tmp_path):
    from runners import checkpointing as ckpt

    job = tmp_path / "job"
    ckpt.save_checkpoint(job / "checkpoints" / "step_00000002", {"w": torch.ones(2)}, {"state": {}}, {"global_step": 2})
    # a run killed mid-save leaves only a hidden temp dir, and a dir without state.pt is incomplete
    (job / "checkpoints" / ".step_00000004.tmp123").mkdir()
    (job / "checkpoints" / "step_00000006").mkdir()
    assert ckpt.latest_checkpoint(job).name == "step_00000002"
    opt, state = ckpt.load_checkpoint_state(job / "checkpoints" / "step_00000002")
    assert state["global_step"] == 2 and opt == {"state": {}}


def test_rng_state_round_trip():
    import random

    import numpy as np

    from runners import checkpointing as ckpt

    state = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_global_batch_sampler_layouts_agree():
    from runners.data import GlobalBatchSampler

    one = GlobalBatchSampler(20, 4, shuffle=True, seed=5)
    two = [GlobalBatchSampler(20, 2, rank=r, world_size=2, shuffle=True, seed=5) for r in range(2)]
    for s in (one, *two):
        s.set_epoch(3)
    assert [a + b for a, b in zip(*[list(s) for s in two])] == list(one)
    full = list(one)
    assert len(full) == 5 and sorted(sum(full, [])) == list(range(20))
    one.set_start(2)  # resume: skip two global batches of the same epoch
    assert len(one) == 3 and list(one) == full[2:]
    one.set_epoch(4)
    assert list(one) != full  # a new epoch reshuffles


def test_non_distributed_never_initialises_process_group(tmp_path, fake_plugin_dir):
    runner = build_runner(tmp_path, fake_plugin_dir, max_epoch=1)
    runner.train()
    assert not torch.distributed.is_initialized()
    assert type(runner.model) is type(runner.raw_model)


# -- end-to-end CLI on the real tiny BLIP-2 models and the LAVIS-layout fixture tree ---------------------
@pytest.fixture(scope="module")
def lavis_tree(tmp_path_factory) -> Path:
    from tests.fixtures_data import make_lavis_tree

    root = tmp_path_factory.mktemp("lavis_tree")
    make_lavis_tree(root, with_video=False, with_shards=True)
    return root


def tiny_project(tmp_path: Path, stage: str) -> dict:
    """A project YAML for a few steps of one stage on fixture data (deterministic eval preprocessing)."""
    procs = {"vis_processor": {"train": {"name": "blip_image_eval", "image_size": 64},
                               "eval": {"name": "blip_image_eval", "image_size": 64}}}
    run = {"lr_sched": "linear_warmup_cosine_lr", "init_lr": 1e-4, "min_lr": 1e-5, "warmup_lr": 1e-6,
           "warmup_steps": 1, "weight_decay": 0.05, "beta2": 0.98, "max_epoch": 1, "batch_size_train": 4,
           "batch_size_eval": 4, "num_workers": 0, "seed": 42, "device": "cpu", "amp": "bf16", "log_freq": 1,
           "output_dir": str(tmp_path / "out"), "job_name": stage, "train_splits": ["train"]}
    if stage == "stage1":  # ITC + ITM + ITG; validated and tested by retrieval recall
        return {"model": {"arch": "blip2", "model_type": "tiny"},
                "datasets": {"coco_retrieval": {**procs, "text_processor": {"train": {"name": "blip_caption"},
                                                                              "eval": {"name": "blip_caption"}}}},
                "run": {**run, "task": "retrieval", "valid_splits": ["val"], "test_splits": ["test"], "k_test": 4}}
    if stage == "stage2_opt":  # LM loss through the frozen OPT; captioning scored with BLEU-4 and CIDEr
        return {"model": {"arch": "blip2_opt", "model_type": "tiny", "prompt": "a photo of"},
                "datasets": {"coco_caption": {**procs, "text_processor": {
                    "train": {"name": "blip_caption", "prompt": "a photo of "}, "eval": {"name": "blip_caption"}}}},
                "run": {**run, "task": "captioning", "valid_splits": ["val"], "test_splits": ["test"],
                        "num_beams": 2, "max_len": 8, "min_len": 1, "caption_metrics": ["Bleu_4", "CIDEr"],
                        "cache_image_features": True}}  # under <cache root>/feature_cache
    if stage == "stage2_t5":  # prefix-LM loss through the frozen T5 on VQA answers; VQA accuracy
        return {"model": {"arch": "blip2_t5", "model_type": "tiny", "prompt": "Question: {} Short answer:"},
                "datasets": {"coco_vqa": {**procs, "text_processor": {"train": {"name": "blip_question"},
                                                                        "eval": {"name": "blip_question"}}}},
                "run": {**run, "task": "vqa", "lr_sched": "constant_lr", "test_splits": ["val"], "num_beams": 2,
                        "max_len": 4, "inference_method": "generate", "prompt": "Question: {} Short answer:",
                        "cache_image_features": True, "feature_cache_dir": str(tmp_path / "features")}}
    raise ValueError(stage)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage1", "stage2_opt", "stage2_t5"])
def test_cli_train_and_evaluate_tiny_blip2(stage, tmp_path, lavis_tree):
    from safetensors.torch import load_file

    import registry

    cfg_path = write_yaml(tmp_path / f"{stage}.yaml", tiny_project(tmp_path, stage))
    env = subprocess_env()
    env["BLIP2_CACHE_ROOT"] = str(lavis_tree)
    proc = run_cli("runners.train", ["--cfg", str(cfg_path)], env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = last_json_line(proc.stdout)
    job = Path(summary["job_dir"])
    assert job == tmp_path / "out" / stage

    log = read_log(job)
    steps = [r for r in log if r["type"] == "train_step"]
    assert steps and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    if stage == "stage1":
        assert {"loss_itc", "loss_itm", "loss_itg"} <= set(steps[0])
    final = sorted((job / "checkpoints").iterdir())[-1]
    weights = load_file(final / "model.safetensors")
    # trainable parameters only: the Q-Former is there, the frozen ViT (and LLM) are not
    assert any(k.startswith("Qformer.") for k in weights) and "query_tokens" in weights
    assert not any(k.startswith(("visual_encoder.", "llm.", "opt_model.", "t5_model.")) for k in weights)
    arch = {"stage1": "blip2", "stage2_opt": "blip2_opt", "stage2_t5": "blip2_t5"}[stage]
    model = registry.models.get(arch).from_pretrained("tiny")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= set(weights), sorted(trainable - set(weights))[:5]
    assert len(weights) < len(model.state_dict())
    optimizer = torch.load(final / "optimizer.pt", weights_only=True)
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(trainable)

    test_split = tiny_project(tmp_path, stage)["run"]["test_splits"][0]
    metrics = summary["results"][test_split]
    assert "agg_metrics" in metrics
    if stage == "stage1":
        assert {"txt_r1", "img_r1", "r_mean"} <= set(metrics)
        assert summary["results"]["best_epoch"] == 0 and (job / "checkpoint_best" / "model.safetensors").is_file()
    if stage != "stage1":  # run.cache_image_features stored the frozen encoder's output for the images it saw
        root = tmp_path / "features" if stage == "stage2_t5" else lavis_tree / "feature_cache"  # run.feature_cache_dir
        keys = list(root.glob("*/rank0/keys.txt"))
        assert keys and len(keys[0].read_text().split()) > 0
    if stage == "stage2_opt":
        assert {"Bleu_4", "CIDEr"} <= set(metrics)
    if stage == "stage2_t5":
        assert metrics["num_questions"] > 0 and 0.0 <= metrics["agg_metrics"] <= 100.0
        return
    # runners.evaluate with the best checkpoint reproduces the training run's final test metrics
    proc = run_cli("runners.evaluate", ["--cfg", str(cfg_path), "--checkpoint", str(job / "checkpoint_best"),
                                        "--options", "run.job_name=null"], env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    eval_summary = last_json_line(proc.stdout)
    assert Path(eval_summary["job_dir"]).parent == job.parent and Path(eval_summary["job_dir"]) != job
    assert any(r["type"] == "eval" for r in read_log(Path(eval_summary["job_dir"])))
    evaluated = eval_summary["results"][test_split]
    for key in ("agg_metrics", "txt_r1", "Bleu_4"):
        if key in metrics:
            assert evaluated[key] == pytest.approx(metrics[key], abs=1e-6)


def test_launcher_env_torchrun_slurm_and_single(monkeypatch):
    from runners.distributed import _first_slurm_host, init_distributed, launcher_env

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                "SLURM_JOB_NODELIST", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert launcher_env() is None
    info = init_distributed("cpu")  # a plain run: no process group, rank 0 of 1
    assert (info.rank, info.world_size, info.distributed) == (0, 1, False) and not torch.distributed.is_initialized()
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08,11]")
    assert launcher_env() == {"rank": 5, "world_size": 8, "local_rank": 1}
    assert os.environ["MASTER_ADDR"] == "gpu07"
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert launcher_env() == {"rank": 3, "world_size": 4, "local_rank": 3}  # torchrun wins over SLURM
    assert _first_slurm_host("node1,node2") == "node1" and _first_slurm_host("a[3]") == "a3"


def test_tensorboard_flag_needs_tensorboard(tmp_path, fake_plugin_dir):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tensorboard"):
            build_runner(tmp_path, fake_plugin_dir, tensorboard=True)
    else:
        runner = build_runner(tmp_path, fake_plugin_dir, tensorboard=True, max_epoch=1)
        runner.train()
        assert any((runner.job_dir / "tensorboard").iterdir())


@pytest.mark.slow
def test_runner_iter_streams_webdataset_mixed_with_map_style(tmp_path, lavis_tree, monkeypatch):
    """Stage-1 pre-training on LAION-style webdataset shards mixed 1:1 with COCO (the paper's setting)."""
    monkeypatch.setenv("BLIP2_CACHE_ROOT", str(lavis_tree))
    procs = {"vis_processor": {"train": {"name": "blip_image_eval", "image_size": 64}}}
    cfg = {"model": {"arch": "blip2", "model_type": "tiny"},
           "datasets": {"laion": {**procs, "build_info": {"storage": "laion/shards/{00000..00002}.tar"}},
                        "coco_caption": procs},
           "run": {"task": "image_text_pretrain", "runner": "runner_iter", "max_iters": 3, "iters_per_inner_epoch": 2,
                   "train_dataset_ratios": {"laion": 1, "coco_caption": 1}, "lr_sched": "linear_warmup_cosine_lr",
                   "init_lr": 1e-4, "min_lr": 1e-5, "batch_size_train": 2, "num_workers": 0, "seed": 42,
                   "device": "cpu", "amp": "bf16", "log_freq": 1, "output_dir": str(tmp_path / "out"),
                   "train_splits": ["train"]}}
    runner = build_runner(tmp_path, None, cfg=cfg, plugins=())
    runner.train()
    log = read_log(runner.job_dir)
    assert [r["step"] for r in log if r["type"] == "train_step"] == [1, 2, 3]
    assert all(r["loss_itc"] > 0 and r["loss_itg"] > 0 for r in log if r["type"] == "train_step")
    lrs = [r["lr"] for r in log if r["type"] == "train_step"]
    assert lrs[0] > lrs[1] > lrs[2] >= 1e-5  # cosine over max_iters, per step
    assert sorted(p.name for p in (runner.job_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
