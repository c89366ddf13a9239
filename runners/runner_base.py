"""Epoch-based runner: optimisation loop, evaluation, best checkpoint, resume (``runner_base``).

Per optimizer step: LR set from the schedule, ``accum_grad_iters`` micro-batches (DDP ``no_sync``
on all but the last), autocast (bf16/fp16), a collective finite-loss check, GradScaler for fp16,
gradient clipping, AdamW step. The data order is a function of (seed, epoch), so a run resumed
from a mid-epoch checkpoint replays exactly what the uninterrupted run would have done.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

import registry
from common import dist as dist_utils
from common.device import move_to_device
from common.paths import cache_root
from common.precision import autocast, resolve_amp
from runners import checkpointing as ckpt, stopping
from runners.batch_stream import BatchStream
from runners.data import eval_loader, merge_train_datasets, train_loader
from runners.lr_schedulers import build_lr_scheduler
from runners.optim import build_optimizer, count_trainable
from runners.run_logging import JobClaimError, MetricsLog, create_job_dir
from runners.run_schema import RunKey
from runners.wrapping import full_optimizer_state, full_trainable_state, load_optimizer_state, load_weights, wrap_model

logger = logging.getLogger("runners")


@contextlib.contextmanager
def _no_grad_sync(model: torch.nn.Module):
    """Skip the gradient all-reduce of a non-final accumulation micro-step (DDP no_sync / FSDP)."""
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; raised before the weights are touched."""


def _run_node(cfg: Any) -> Any:
    """The ``run`` section of a Config object or of a plain DictConfig."""
    for attr in ("run", "run_cfg"):
        node = getattr(cfg, attr, None)
        if node is not None:
            return node
    return cfg["run"]


def _to_container(cfg: Any) -> Any:
    for attr in ("to_dict", "config", "cfg"):
        value = getattr(cfg, attr, None)
        if callable(value):
            value = value()
        if isinstance(value, dict) or OmegaConf.is_config(value):
            return value
    return cfg


@registry.runners.register("runner_base")
class RunnerBase:
    """``Runner(cfg, task, model, datasets, job_id)``; ``.train()`` / ``.evaluate()``."""

    # run: keys this runner reads beyond runners.run_schema.RUN_SCHEMA (validated by Config).
    RUN_KEYS = {
        "save_every_steps": RunKey("also write a resumable checkpoint every N optimizer steps (0: only at epoch "
                                   "ends)", (int,), low=0),
        "keep_last_ckpts": RunKey("resumable step checkpoints kept in <job>/checkpoints (older ones are deleted; "
                                  "0: keep all)", (int,), low=0),
        "find_unused_parameters": RunKey("DDP find_unused_parameters (only for models with unused trainable "
                                         "parameters)", (bool,)),
        "dist_timeout_minutes": RunKey("timeout of torch.distributed collectives", (int, float), low=0.0,
                                       open_low=True),
        "adam_eps": RunKey("AdamW epsilon (1e-8)", (int, float), low=0.0, open_low=True),
    }

    def __init__(self, cfg: Any, task: Any, model: torch.nn.Module, datasets: dict[str, dict[str, Any]],
                 job_id: str, resume_from: str | Path | None = None) -> None:
        self.cfg = cfg
        self.run_cfg = _run_node(cfg)
        self.task = task
        self.datasets = datasets
        self.job_id = job_id
        get = self.run_cfg.get
        self.rank, self.world_size = dist_utils.get_rank(), dist_utils.get_world_size()
        self.is_main = self.rank == 0
        self.device = self._resolve_device(str(get("device", "cpu")))
        self.amp_dtype = resolve_amp(get("amp", "off"), self.device)
        self.accum = int(get("accum_grad_iters", 1) or 1)
        self.max_grad_norm = get("grad_clip", None)
        self.seed = int(get("seed", 42))
        self.log_freq = max(int(get("log_freq", 50) or 1), 1)
        self.save_every_steps = int(get("save_every_steps", 0) or 0)
        self.keep_last = int(get("keep_last_ckpts", 2) or 0)
        self.resume_from = Path(resume_from) if resume_from else (
            Path(get("resume_ckpt_path")) if get("resume_ckpt_path") else None)

        # Job directory: a resumed run continues in the directory of its checkpoint.
        output_dir = Path(str(get("output_dir", "output"))).expanduser()
        self.job_dir = self.resume_from.parent.parent if self.resume_from else output_dir / job_id
        if self.is_main:
            create_job_dir(self.job_dir.parent, self.job_dir.name, exist_ok=True)
        dist_utils.barrier()
        self.metrics_log = MetricsLog(self.job_dir if self.is_main else None, bool(get("tensorboard", False)))
        if hasattr(task, "set_output_dir"):
            task.set_output_dir(self.job_dir)

        self.raw_model = model.to(self.device)
        if get("cache_image_features", False):
            self._enable_feature_cache()
        self.trainable_keys = sorted(ckpt.trainable_state_dict(self.raw_model))
        self.resume_state: dict | None = None
        self.resume_optimizer: dict | None = None
        if self.resume_from is not None:
            self.resume_optimizer, self.resume_state = ckpt.load_checkpoint_state(self.resume_from)
            ckpt.load_trainable_weights(self.raw_model, self.resume_from)
            logger.info("resuming from %s (global step %d)", self.resume_from, self.resume_state["global_step"])
        self.model = wrap_model(self.raw_model, self.run_cfg, self.device)
        self._optimizer = None
        self._scheduler = None
        self.scaler = None
        if self.amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler("cuda")
        self.global_step = 0
        self.start_epoch = 0
        self.stop_requested = False  # a stop signal reached some rank (agreed by all ranks after each step)
        self.last_saved: Path | None = None
        self._last_saved_step = -1
        self._epoch_sums: dict[str, float] = {}
        self.best_metric: float | None = None
        self.best_epoch: int | None = None

    # -- setup --------------------------------------------------------------------------------
    def _resolve_device(self, device: str) -> torch.device:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RuntimeError(f"run.device={device!r} but CUDA is not available; set run.device=cpu")
            if dist_utils.is_dist():
                return torch.device("cuda", torch.cuda.current_device())
        return torch.device(device)

    def split_datasets(self, split: str) -> dict[str, Any]:
        """{dataset name: dataset} of every dataset that has ``split``."""
        return {name: splits[split] for name, splits in self.datasets.items() if split in splits}

    def build_train_stream(self) -> BatchStream:
        splits = list(self.run_cfg.get("train_splits", ["train"]) or [])
        parts = {(name if len(splits) == 1 else f"{name}/{split}"): ds
                 for split in splits for name, ds in self.split_datasets(split).items()}
        if not parts:
            raise ValueError(f"no dataset has the training splits {splits} (run.train_splits)")
        ratios = self.run_cfg.get("train_dataset_ratios", None)
        if ratios is not None:
            ratios = OmegaConf.to_container(ratios) if OmegaConf.is_config(ratios) else ratios
        dataset = merge_train_datasets(parts, ratios, seed=self.seed)
        loader = train_loader(
            dataset, int(self.run_cfg.get("batch_size_train")), int(self.run_cfg.get("num_workers", 0)),
            self.rank, self.world_size, self.seed, pin_memory=self.device.type == "cuda",
        )
        return BatchStream(loader)

    def steps_per_epoch(self, stream: BatchStream) -> int:
        batches = stream.batches_per_epoch()
        if batches is None:
            raise ValueError("streaming training data has no epoch length: use runner: runner_iter "
                             "with max_iters and iters_per_inner_epoch")
        steps = batches // self.accum
        if steps < 1:
            raise ValueError(f"one epoch has {batches} batches, fewer than run.accum_grad_iters={self.accum}")
        return steps

    def total_steps(self, steps_per_epoch: int) -> int:
        return int(self.run_cfg.get("max_epoch")) * steps_per_epoch

    def setup_optimization(self, steps_per_epoch: int) -> None:
        self.optimizer = build_optimizer(self.raw_model, self.run_cfg)
        self.scheduler = build_lr_scheduler(
            str(self.run_cfg.get("lr_sched", "linear_warmup_cosine_lr")), self.optimizer, self.run_cfg,
            self.total_steps(steps_per_epoch), steps_per_epoch,
        )
        trainable, total = count_trainable(self.raw_model)
        logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100.0 * trainable / max(total, 1))

    # -- one optimizer step -----------------------------------------------------------------------
    def optimizer_step(self, stream: BatchStream, epoch: int) -> dict[str, float]:
        """Accumulate ``accum_grad_iters`` micro-batches and update; returns rank-averaged logs."""
        lr = self.scheduler.step(self.global_step)
        self.model.train()
        totals: dict[str, float] = {}
        for micro in range(self.accum):
            samples = move_to_device(stream.next(), self.device)
            if isinstance(samples, dict):
                samples.update(epoch=epoch, iters=self.global_step)
            last = micro == self.accum - 1
            sync = contextlib.nullcontext() if last else _no_grad_sync(self.model)
            with sync:
                with autocast(self.device, self.amp_dtype):
                    loss, logs = self.task.train_step(self.model, samples)
                self._check_finite(loss, epoch, micro)
                scaled = loss / self.accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            for k, v in {"loss": loss.detach(), **(logs or {})}.items():
                totals[k] = totals.get(k, 0.0) + float(v) / self.accum
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, float(self.max_grad_norm))  # DTensor-aware (FSDP)
            totals["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        totals["_stop"] = 1.0 if stopping.requested_signal() else 0.0  # rides on the logs' all-reduce
        keys = sorted(totals)
        # on the run's device: NCCL reduces only CUDA tensors
        mean = dist_utils.all_reduce_sum(torch.tensor([totals[k] for k in keys], dtype=torch.float64,
                                                      device=self.device)).tolist()
        logs = {k: float(v) / self.world_size for k, v in zip(keys, mean)}
        self.stop_requested = logs.pop("_stop") > 0
        logs["lr"] = lr
        return logs

    def _check_finite(self, loss: torch.Tensor, epoch: int, micro: int) -> None:
        """Stop every rank together if any rank's loss is NaN/inf (before backward touches grads)."""
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], dtype=torch.float64)
        bad = dist_utils.all_reduce_sum(bad)
        if bad.item() > 0:
            raise NonFiniteLossError(
                f"non-finite training loss ({float(loss.detach())} on rank {self.rank}) at optimizer step "
                f"{self.global_step} (epoch {epoch}, micro-batch {micro}); stopping before the weights are "
                f"updated. Lower run.init_lr, set run.grad_clip, or use run.amp=bf16 instead of fp16."
            )

    # -- training -------------------------------------------------------------------------------
    def train_steps(self, stream: BatchStream, epoch: int, first_step: int, num_steps: int) -> dict[str, float]:
        """Run steps ``first_step..num_steps-1`` of ``epoch``; returns the epoch's mean logs (a resumed epoch
        includes the sums of its steps before the checkpoint). On a stop signal: checkpoint, then Preempted."""
        sums = self._epoch_sums if first_step > 0 else {}
        self._epoch_sums = sums
        with tqdm(total=num_steps, initial=first_step, desc=f"epoch {epoch}", disable=not self.is_main,
                  dynamic_ncols=True, mininterval=1.0) as bar:  # closed (line ended) before any error message
            for step in range(first_step, num_steps):
                logs = self.optimizer_step(stream, epoch)
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
                bar.update(1)
                if self.global_step % self.log_freq == 0:
                    self.metrics_log.write({"type": "train_step", "epoch": epoch, "step": self.global_step, **logs},
                                           step=self.global_step)
                if self.save_every_steps and self.global_step % self.save_every_steps == 0 and step < num_steps - 1:
                    self.save_resumable(epoch, stream)
                if self.stop_requested:
                    break
        if self.stop_requested:
            self.stop_now(epoch, stream)
        return {k: v / max(num_steps, 1) for k, v in sums.items()}

    def stop_now(self, epoch: int, stream: BatchStream, end_of_epoch: bool = False) -> None:
        """Checkpoint (unless this step's is already written) and raise Preempted."""
        if self._last_saved_step != self.global_step:
            self.save_resumable(epoch, stream, end_of_epoch=end_of_epoch)
        raise stopping.Preempted(
            f"stopped by {stopping.requested_signal() or 'a signal on another rank'} after optimizer step "
            f"{self.global_step}; checkpoint {self.last_saved}. Continue with --resume auto")

    def train(self) -> dict[str, Any]:
        """Train for ``max_epoch`` epochs, validating every ``val_freq``; then test with the best weights."""
        stream = self.build_train_stream()
        steps = self.steps_per_epoch(stream)
        self.setup_optimization(steps)
        self.check_free_space()
        self.save_config()
        max_epoch = int(self.run_cfg.get("max_epoch"))
        first_step = self.restore(stream, steps)
        val_freq = max(int(self.run_cfg.get("val_freq", 1) or 1), 1)
        valid_splits = list(self.run_cfg.get("valid_splits", []) or [])
        for epoch in range(self.start_epoch, max_epoch):
            if first_step == 0:
                stream.start_epoch(epoch)
            stats = self.train_steps(stream, epoch, first_step, steps)
            first_step = 0
            self.end_epoch(epoch, stream, stats, valid_splits and ((epoch + 1) % val_freq == 0 or epoch == max_epoch - 1))
            if stopping.should_stop():
                self.stop_now(epoch, stream, end_of_epoch=True)
        return self.finish()

    def end_epoch(self, epoch: int, stream: BatchStream, stats: dict[str, float], validate: bool) -> None:
        """Log the epoch, validate, write the end-of-epoch checkpoint. If validation fails (e.g. a bad file
        in the eval set) in a single-process run, the epoch's training is first saved as a checkpoint
        before the end-of-epoch work, so a resume repeats only the validation."""
        position = self.metrics_log.position()
        self.metrics_log.write({"type": "train_epoch", "epoch": epoch, "step": self.global_step, **stats},
                               step=self.global_step)
        if validate:
            try:
                self.validate(list(self.run_cfg.get("valid_splits", []) or []), epoch)
            except Exception:
                if self.world_size == 1 and self._last_saved_step != self.global_step:
                    self.save_resumable(epoch, stream, log_position=position)
                    logger.error("validation failed; the epoch's training is saved in %s", self.last_saved)
                raise
        self.save_resumable(epoch, stream, end_of_epoch=True)

    def check_free_space(self) -> None:
        """Refuse to train when the job's disk cannot hold one checkpoint (weights + AdamW's two moments)."""
        if not self.is_main or self.resume_from is not None:  # a resumed run was checked against its checkpoint
            return
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        needed = sum(p.numel() * p.element_size() for p in params) + sum(p.numel() * 4 * 2 for p in params)
        free = shutil.disk_usage(self.job_dir).free
        if free < needed:
            raise JobClaimError(f"not enough free space for a checkpoint in {self.job_dir}: {free / 2**20:.1f} MiB "
                                f"free, one checkpoint needs about {needed / 2**20:.1f} MiB")

    def validate(self, splits: list[str], epoch: int) -> None:
        for split in splits:
            metrics = self.eval_split(split, epoch)
            agg = metrics.get("agg_metrics")
            if split == splits[0] and agg is not None and (self.best_metric is None or agg > self.best_metric):
                self.best_metric, self.best_epoch = float(agg), epoch
                self.save_best(epoch)

    def finish(self) -> dict[str, Any]:
        """Final test-split evaluation with the best checkpoint (or the last weights if none)."""
        results: dict[str, Any] = {"best_epoch": self.best_epoch, "best_agg_metrics": self.best_metric}
        test_splits = list(self.run_cfg.get("test_splits", []) or [])
        if test_splits:
            best = self.job_dir / "checkpoint_best"
            if (best / ckpt.MODEL_FILE).is_file():
                load_weights(self.model, self.raw_model, best)
                logger.info("testing with the best checkpoint (epoch %s)", self.best_epoch)
            for split in test_splits:
                results[split] = self.eval_split(split, "best" if self.best_epoch is not None else "last")
        self.metrics_log.close()
        return results

    def _enable_feature_cache(self) -> None:
        """run.cache_image_features: reuse the frozen encoder's output across epochs (see models/feature_cache.py)."""
        if not hasattr(self.raw_model, "enable_feature_cache"):
            raise ValueError(f"run.cache_image_features: {type(self.raw_model).__name__} has no frozen image encoder")
        root = os.path.expanduser(self.run_cfg.get("feature_cache_dir") or os.path.join(cache_root(), "feature_cache"))
        self.raw_model.enable_feature_cache(root, rank=self.rank)
        if getattr(self.raw_model, "feature_cache", None) is not None:
            logger.info("frozen-feature cache on under %s (valid only with deterministic image preprocessing)", root)

    def evaluate(self) -> dict[str, Any]:
        """Evaluate the current weights on ``test_splits`` (or ``valid_splits``); used by runners.evaluate."""
        self.save_config()
        splits = list(self.run_cfg.get("test_splits", []) or self.run_cfg.get("valid_splits", []) or [])
        if not splits:
            raise ValueError("nothing to evaluate: set run.test_splits (or run.valid_splits)")
        results = {split: self.eval_split(split, "eval") for split in splits}
        self.metrics_log.close()
        return results

    @torch.no_grad()
    def eval_split(self, split: str, epoch: Any) -> dict[str, Any]:
        """Run the task's evaluation on every dataset having ``split``; metrics from rank 0."""
        found = self.split_datasets(split)
        if not found:
            raise ValueError(f"no dataset has the split '{split}' (run.valid_splits / run.test_splits)")
        split_across = bool(self.run_cfg.get("use_dist_eval_sampler", True)) and bool(
            getattr(self.task, "split_eval_across_ranks", True))
        all_metrics: dict[str, Any] = {}
        model = self.raw_model
        model.eval()
        for name, dataset in found.items():
            loader = eval_loader(dataset, int(self.run_cfg.get("batch_size_eval", 1)),
                                 int(self.run_cfg.get("num_workers", 0)), self.rank, self.world_size, split_across)
            if hasattr(self.task, "before_evaluation"):
                self.task.before_evaluation(model, dataset, name=name)
            with autocast(self.device, self.amp_dtype):
                results = self.task.evaluation(model, loader)
            metrics = self.task.after_evaluation(results, split, epoch) or {}
            metrics = dist_utils.broadcast_object(metrics)
            all_metrics[name] = metrics
            self.metrics_log.write({"type": "eval", "split": split, "dataset": name, "epoch": epoch, **metrics},
                                   step=self.global_step)
            logger.info("%s/%s epoch %s: %s", name, split, epoch, metrics)
        if len(all_metrics) == 1:
            return next(iter(all_metrics.values()))
        aggs = [m["agg_metrics"] for m in all_metrics.values() if "agg_metrics" in m]
        return {**all_metrics, **({"agg_metrics": sum(aggs) / len(aggs)} if aggs else {})}

    # -- checkpoints ------------------------------------------------------------------------------
    def save_config(self) -> None:
        if self.is_main:
            container = _to_container(self.cfg)
            OmegaConf.save(OmegaConf.create(OmegaConf.to_container(container, resolve=True)
                                            if OmegaConf.is_config(container) else container),
                           self.job_dir / "config.yaml")

    def _model_state(self) -> dict[str, torch.Tensor]:
        return full_trainable_state(self.model, self.raw_model, self.trainable_keys)

    def _optimizer_state(self) -> dict:
        return full_optimizer_state(self.model, self.optimizer)

    def save_resumable(self, epoch: int, stream: BatchStream, end_of_epoch: bool = False,
                       log_position: int | None = None) -> None:
        """Write ``checkpoints/step_N`` (collective: every rank contributes its RNG state)."""
        model_state, opt_state = self._model_state(), self._optimizer_state()
        rng = dist_utils.gather_objects(ckpt.rng_state())
        if self.is_main:
            state = {
                "epoch": epoch, "end_of_epoch": end_of_epoch, "global_step": self.global_step,
                "data": stream.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "best_metric": self.best_metric, "best_epoch": self.best_epoch,
                "world_size": self.world_size, "rng": rng, "epoch_sums": dict(self._epoch_sums),
                "log_position": self.metrics_log.position() if log_position is None else log_position,
            }
            path = ckpt.save_checkpoint(self.job_dir / "checkpoints" / f"step_{self.global_step:08d}",
                                        model_state, opt_state, state)
            save_freq = int(self.run_cfg.get("save_freq", 0) or 0)
            if end_of_epoch and save_freq > 0 and (epoch + 1) % save_freq == 0:
                ckpt.save_checkpoint(self.job_dir / f"checkpoint_epoch{epoch}", model_state, None,
                                     {"epoch": epoch, "global_step": self.global_step})
            ckpt.prune_checkpoints(self.job_dir, self.keep_last)
            logger.info("saved %s", path)
            self.last_saved = path
        self._last_saved_step = self.global_step
        dist_utils.barrier()

    def save_best(self, epoch: int) -> None:
        model_state = self._model_state()
        if self.is_main:
            ckpt.save_checkpoint(self.job_dir / "checkpoint_best", model_state, None,
                                 {"epoch": epoch, "global_step": self.global_step, "agg_metrics": self.best_metric})
        dist_utils.barrier()

    def restore(self, stream: BatchStream, steps_per_epoch: int) -> int:
        """Apply the resume state (optimizer, schedule, scaler, RNG, data position); returns the step
        within ``self.start_epoch`` to continue from."""
        state = self.resume_state
        if state is None:
            return 0
        load_optimizer_state(self.model, self.optimizer, self.resume_optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.global_step = int(state["global_step"])
        if "log_position" in state:  # steps after the checkpoint are replayed: log each once
            dropped = self.metrics_log.rewind(int(state["log_position"]))
            if dropped:
                logger.info("log.jsonl: dropped %d records written after %s (they are replayed)", dropped,
                            self.resume_from.name)
        self._epoch_sums = dict(state.get("epoch_sums") or {})
        self.best_metric, self.best_epoch = state.get("best_metric"), state.get("best_epoch")
        rng = state["rng"]
        if int(state.get("world_size", 1)) == self.world_size:
            ckpt.set_rng_state(rng[self.rank])
        else:
            logger.warning("resuming on %d processes from a %d-process checkpoint: RNG streams are re-seeded",
                           self.world_size, state.get("world_size"))
            torch.manual_seed(self.seed + self.rank + self.global_step)
        epoch = int(state["epoch"])
        if state.get("end_of_epoch"):
            self.start_epoch = epoch + 1
            return 0
        stream.load_state_dict(state["data"])
        self.start_epoch = epoch
        return self.global_step - epoch * steps_per_epoch
