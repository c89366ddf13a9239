"""LR schedules: per-step warmup and cosine, step decay, constant, lr_scale per group, resume."""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

import registry
from runners.lr_schedulers import build_lr_scheduler


def _optimizer(scales=(1.0, 0.5)) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr_scale": s} for s in scales]
    groups.append({"params": [torch.nn.Parameter(torch.zeros(2))]})  # no lr_scale -> 1
    return torch.optim.AdamW(groups, lr=1.0)


def _run(**kw):
    base = dict(init_lr=1e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=10)
    base.update(kw)
    return OmegaConf.create(base)


def test_registered_names():
    assert {"linear_warmup_cosine_lr", "linear_warmup_step_lr", "constant_lr"} <= set(registry.lr_schedulers.list())


def test_cosine_warmup_then_per_step_decay_to_min_lr():
    opt = _optimizer()
    sched = build_lr_scheduler("linear_warmup_cosine_lr", opt, _run(), total_steps=110, steps_per_epoch=11)
    lrs = [sched.step(s) for s in range(111)]
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[5] == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5)
    assert lrs[10] == pytest.approx(1e-4)  # warmup over: peak
    # cosine per step, not per epoch: consecutive steps inside one epoch differ
    assert lrs[12] < lrs[11] < lrs[10]
    mid = 10 + 50
    assert lrs[mid] == pytest.approx(1e-5 + (1e-4 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warmup


def test_lr_scale_applied_to_every_group():
    opt = _optimizer(scales=(1.0, 0.25))
    sched = build_lr_scheduler("linear_warmup_cosine_lr", opt, _run(warmup_steps=0), total_steps=100, steps_per_epoch=10)
    base = sched.step(37)
    got = [g["lr"] for g in opt.param_groups]
    assert got == pytest.approx([base, 0.25 * base, base])


def test_step_lr_decays_per_epoch_after_warmup():
    opt = _optimizer()
    sched = build_lr_scheduler("linear_warmup_step_lr", opt, _run(lr_decay_rate=0.5, min_lr=2e-5),
                               total_steps=100, steps_per_epoch=20)
    assert sched.step(0) == pytest.approx(1e-6)
    assert sched.step(15) == pytest.approx(1e-4)  # epoch 0
    assert sched.step(25) == pytest.approx(5e-5)  # epoch 1
    assert sched.step(45) == pytest.approx(2.5e-5)  # epoch 2
    assert sched.step(65) == pytest.approx(2e-5)  # floored at min_lr


def test_step_lr_requires_decay_rate():
    with pytest.raises(ValueError, match="lr_decay_rate"):
        build_lr_scheduler("linear_warmup_step_lr", _optimizer(), _run(), total_steps=10, steps_per_epoch=5)


def test_constant_lr_with_and_without_warmup():
    opt = _optimizer()
    sched = build_lr_scheduler("constant_lr", opt, _run(warmup_steps=4), total_steps=50, steps_per_epoch=5)
    assert sched.step(2) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5)
    assert [sched.step(s) for s in (4, 20, 49)] == pytest.approx([1e-4] * 3)
    sched = build_lr_scheduler("constant_lr", opt, _run(warmup_steps=0, warmup_lr=-1), total_steps=5, steps_per_epoch=5)
    assert sched.step(0) == pytest.approx(1e-4)


def test_negative_warmup_lr_means_init_lr(caplog):
    """LAVIS's convention, kept: no ramp when warmup_lr is unset or negative; a warning says so."""
    opt = _optimizer()
    with caplog.at_level("WARNING", logger="runners.lr_schedulers"):
        sched = build_lr_scheduler("linear_warmup_cosine_lr", opt, _run(warmup_lr=-1, warmup_steps=5),
                                   total_steps=20, steps_per_epoch=5)
    assert sched.step(0) == pytest.approx(1e-4) == sched.step(4)
    assert "run.warmup_steps=5 ramps nothing" in caplog.text and "set run.warmup_lr" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="runners.lr_schedulers"):
        build_lr_scheduler("linear_warmup_cosine_lr", opt, _run(warmup_lr=1e-6, warmup_steps=5), 20, 5)
        build_lr_scheduler("linear_warmup_cosine_lr", opt, _run(warmup_lr=-1, warmup_steps=0), 20, 5)
    assert caplog.text == ""


def test_state_dict_round_trip_restores_lrs():
    opt = _optimizer()
    sched = build_lr_scheduler("linear_warmup_cosine_lr", opt, _run(), total_steps=40, steps_per_epoch=8)
    sched.step(23)
    expected = [g["lr"] for g in opt.param_groups]
    opt2 = _optimizer()
    sched2 = build_lr_scheduler("linear_warmup_cosine_lr", opt2, _run(), total_steps=40, steps_per_epoch=8)
    sched2.load_state_dict(sched.state_dict())
    assert [g["lr"] for g in opt2.param_groups] == expected
    assert sched2.last_step == 23
