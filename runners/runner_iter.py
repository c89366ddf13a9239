"""Iteration-based runner (``runner_iter``) for streaming data (webdataset/LAION) or any data.

Trains ``max_iters`` optimizer steps, grouped into "inner epochs" of ``iters_per_inner_epoch``
steps; validation, checkpoints and logs happen at inner-epoch ends. The batch stream runs
across data epochs without restarting at inner-epoch boundaries.
"""
from __future__ import annotations

import math
from typing import Any

import registry
from runners import stopping
from runners.batch_stream import BatchStream
from runners.runner_base import RunnerBase


@registry.runners.register("runner_iter")
class RunnerIter(RunnerBase):
    def _iters(self) -> tuple[int, int]:
        max_iters = self.run_cfg.get("max_iters")
        per_inner = self.run_cfg.get("iters_per_inner_epoch")
        if not max_iters or not per_inner:
            raise ValueError("runner_iter needs run.max_iters and run.iters_per_inner_epoch (positive integers)")
        return int(max_iters), int(per_inner)

    def steps_per_epoch(self, stream: BatchStream) -> int:
        return self._iters()[1]

    def total_steps(self, steps_per_epoch: int) -> int:
        return self._iters()[0]

    def train(self) -> dict[str, Any]:
        max_iters, per_inner = self._iters()
        stream = self.build_train_stream()
        self.setup_optimization(per_inner)
        self.save_config()
        first_step = self.restore(stream, per_inner)
        if self.resume_state is None:
            stream.start_epoch(0)
        elif self.resume_state.get("end_of_epoch"):
            stream.load_state_dict(self.resume_state["data"])
        num_inner = math.ceil(max_iters / per_inner)
        val_freq = max(int(self.run_cfg.get("val_freq", 1) or 1), 1)
        valid_splits = list(self.run_cfg.get("valid_splits", []) or [])
        for inner in range(self.start_epoch, num_inner):
            steps = min(per_inner, max_iters - inner * per_inner)
            stats = self.train_steps(stream, inner, first_step, steps)
            first_step = 0
            self.end_epoch(inner, stream, stats, valid_splits and ((inner + 1) % val_freq == 0 or inner == num_inner - 1))
            if stopping.should_stop():
                self.stop_now(inner, stream, end_of_epoch=True)
        return self.finish()
