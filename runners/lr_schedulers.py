"""Learning-rate schedules, stepped once per optimizer update (never per epoch).

Every schedule computes a base LR from the global optimizer step and writes
``base_lr * group.get("lr_scale", 1.0)`` into each param group, so layer-wise LR decay
(groups carrying ``lr_scale``) is honoured. Schedules are stateless functions of the step,
so resuming only needs the step counter (``state_dict`` / ``load_state_dict``).
Hand-written because torch's ``CosineAnnealingLR`` gives every group the same absolute ``eta_min`` (a group with
``lr_scale`` 0.5 ends at ``min_lr``, 1e-5 for init 1e-4 / min 1e-5, where LAVIS's formula ends it at 5e-6).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch

import registry

logger = logging.getLogger(__name__)


class StepLRSchedule:
    """Base class: subclasses implement ``base_lr(step)``; ``step(global_step)`` applies it."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        init_lr: float,
        min_lr: float = 0.0,
        warmup_lr: float = -1.0,
        warmup_steps: int = 0,
        total_steps: int = 1,
        steps_per_epoch: int = 1,
        **unused: Any,
    ) -> None:
        if init_lr is None or init_lr < 0:
            raise ValueError(f"run.init_lr must be a non-negative number, got {init_lr!r}")
        if warmup_steps < 0:
            raise ValueError(f"run.warmup_steps must be >= 0, got {warmup_steps}")
        self.optimizer = optimizer
        self.init_lr = float(init_lr)
        self.min_lr = float(min_lr if min_lr is not None else 0.0)
        # LAVIS convention: warmup_lr < 0 means "start the warmup at init_lr" (i.e. no warmup ramp).
        self.warmup_lr = float(init_lr if warmup_lr is None or warmup_lr < 0 else warmup_lr)
        if warmup_steps > 0 and self.warmup_lr == self.init_lr:
            logger.warning("run.warmup_steps=%d ramps nothing: run.warmup_lr is unset or equal to run.init_lr, so "
                           "(LAVIS's convention) the LR holds at init_lr (%g) for those steps before it decays; set "
                           "run.warmup_lr (e.g. 1e-6) for a linear ramp", warmup_steps, self.init_lr)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = max(int(total_steps), 1)
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        self.last_step = -1

    def warmup(self, step: int) -> float | None:
        """Linear ramp warmup_lr -> init_lr over ``warmup_steps`` steps; None once it is over."""
        if step < self.warmup_steps:
            return self.warmup_lr + (self.init_lr - self.warmup_lr) * step / self.warmup_steps
        return None

    def base_lr(self, step: int) -> float:
        raise NotImplementedError

    def step(self, global_step: int) -> float:
        """Set every group's LR for optimizer update number ``global_step`` (0-based); returns the base LR."""
        lr = self.base_lr(global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.last_step = global_step
        return lr

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        if self.last_step >= 0:
            self.step(self.last_step)


@registry.lr_schedulers.register("linear_warmup_cosine_lr")
class LinearWarmupCosineLR(StepLRSchedule):
    """Linear warmup for ``warmup_steps`` steps, then cosine decay per step from init_lr to min_lr
    at ``total_steps``."""

    def base_lr(self, step: int) -> float:
        lr = self.warmup(step)
        if lr is not None:
            return lr
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / decay_steps, 1.0)
        return self.min_lr + (self.init_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@registry.lr_schedulers.register("linear_warmup_step_lr")
class LinearWarmupStepLR(StepLRSchedule):
    """Linear warmup, then ``init_lr * lr_decay_rate ** epoch`` (epoch = step // steps_per_epoch),
    floored at min_lr."""

    def __init__(self, optimizer: torch.optim.Optimizer, init_lr: float, lr_decay_rate: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(optimizer, init_lr, **kwargs)
        if lr_decay_rate is None or not 0 < float(lr_decay_rate) <= 1:
            raise ValueError(
                f"run.lr_decay_rate must be in (0, 1] for lr_sched linear_warmup_step_lr, got {lr_decay_rate!r}"
            )
        self.decay_rate = float(lr_decay_rate)

    def base_lr(self, step: int) -> float:
        lr = self.warmup(step)
        if lr is not None:
            return lr
        epoch = step // self.steps_per_epoch
        return max(self.min_lr, self.init_lr * self.decay_rate**epoch)


@registry.lr_schedulers.register("constant_lr")
class ConstantLR(StepLRSchedule):
    """Optional linear warmup, then init_lr forever."""

    def base_lr(self, step: int) -> float:
        lr = self.warmup(step)
        return self.init_lr if lr is None else lr


def build_lr_scheduler(
    name: str, optimizer: torch.optim.Optimizer, run_cfg: Any, total_steps: int, steps_per_epoch: int
) -> StepLRSchedule:
    """Build the schedule named by ``run.lr_sched`` from the run config keys."""
    cls = registry.lr_schedulers.get(name)
    get = run_cfg.get
    return cls(
        optimizer,
        init_lr=get("init_lr"),
        min_lr=get("min_lr", 0.0),
        warmup_lr=get("warmup_lr", -1.0),
        warmup_steps=int(get("warmup_steps", 0) or 0),
        lr_decay_rate=get("lr_decay_rate", None),
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
    )
