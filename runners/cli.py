"""Shared command-line flow of ``runners.train`` and ``runners.evaluate``.

config (merge + validate: errors stop here, before anything is built) -> process group ->
seeds -> job directory -> task -> datasets -> model -> runner.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any, Sequence

import shutil

import numpy as np
import torch

import registry
from common import dist as dist_utils
from datasets.media import BadMediaError
from runners import checkpointing as ckpt
from runners import distributed
from runners.config import Config, ConfigError, add_config_arguments
from runners.checkpointing import CheckpointError
from runners.run_logging import JobClaimError, JobLock, claim_job_dir, new_job_id, release_unused_job_dir, setup_logging
from runners.stopping import DEFAULT_STOP_SIGNALS, Preempted, stop_signals

logger = logging.getLogger("runners")


def build_parser(prog: str, description: str, training: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    if training:
        parser.add_argument(
            "--resume", metavar="auto|PATH", default=None,
            help="continue a run: 'auto' = latest checkpoint of the job named by run.job_name, or of the most "
                 "recent job under run.output_dir (a fresh run starts if there is none); PATH = a checkpoint "
                 "directory <output_dir>/<job>/checkpoints/step_N. Same as run.resume_ckpt_path.")
    else:
        parser.add_argument(
            "--checkpoint", metavar="PATH", default=None,
            help="trainable weights to evaluate: a checkpoint directory written by runners.train "
                 "(e.g. <job>/checkpoint_best) or a .safetensors/.pth state dict")
    parser.add_argument("--print-config", action="store_true", help="print the merged config before running")
    return parser


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False


EXIT_ERROR = 1  # a run-time error (its cause printed on one line)
EXIT_CONFIG = 2  # a config or command-line error, found before anything was built
EXIT_PREEMPTED = 75  # stopped by a signal after writing a checkpoint: --resume auto continues it (EX_TEMPFAIL)


def _newest_job(output_dir: Path) -> Path | None:
    """The job under ``output_dir`` with the newest step checkpoint (by modification time)."""
    candidates = [steps[-1] for job in output_dir.glob("*") if job.is_dir() and (steps := ckpt.step_checkpoints(job))]
    return max(candidates, key=lambda p: p.stat().st_mtime).parent.parent if candidates else None


def _claim(run_cfg: Any, resume: str | None) -> tuple[str, Path | None, JobLock]:
    """Rank 0: claim the job directory and choose the checkpoint to resume from (verified)."""
    output_dir = Path(str(run_cfg.get("output_dir", "output"))).expanduser()
    job_name = run_cfg.get("job_name")
    if resume not in (None, "", "auto"):
        resume_path = Path(resume).expanduser()
        ckpt.verify_checkpoint(resume_path)
        job_dir, lock = claim_job_dir(resume_path.parent.parent.parent, resume_path.parent.parent.name, fresh=False)
        for note in ckpt.clean_temporaries(job_dir):
            logger.info("job %s: %s", job_dir.name, note)
        return job_dir.name, resume_path, lock
    if resume == "auto":
        job = output_dir / job_name if job_name else _newest_job(output_dir)
        job_id = job.name if job is not None else new_job_id()
        job_dir, lock = claim_job_dir(output_dir, job_id, fresh=False)
        for note in ckpt.clean_temporaries(job_dir):
            logger.info("job %s: %s", job_id, note)
        resume_path, skipped = ckpt.latest_valid_checkpoint(job_dir)
        for reason in skipped:
            logger.warning("--resume auto skipped %s", reason)
        if resume_path is None:
            logger.warning("--resume auto: no valid checkpoint in %s; starting a fresh run there", job_dir)
        else:
            logger.info("--resume auto: continuing from %s", resume_path)
        return job_id, resume_path, lock
    job_dir, lock = claim_job_dir(output_dir, job_name or new_job_id(), fresh=True)
    return job_dir.name, None, lock


def resolve_job(run_cfg: Any, resume: str | None) -> tuple[str, Path | None, JobLock | None]:
    """(job id, checkpoint to resume from or None, the job's lock on rank 0), decided on rank 0 and shared
    with all ranks; an error on rank 0 is raised on every rank."""
    lock = None
    if dist_utils.get_rank() == 0:
        resume = resume if resume is not None else run_cfg.get("resume_ckpt_path")
        try:
            job_id, resume_path, lock = _claim(run_cfg, resume)
            decision = (job_id, str(resume_path) if resume_path else None, None)
        except (JobClaimError, CheckpointError) as err:
            decision = (None, None, (type(err).__name__, str(err)))
    else:
        decision = None
    job_id, resume_path, error = dist_utils.broadcast_object(decision)
    if error is not None:
        raise {"JobClaimError": JobClaimError, "CheckpointError": CheckpointError}[error[0]](error[1])
    return job_id, Path(resume_path) if resume_path else None, lock


def _check_free_space(job_dir: Path, resume_path: Path | None) -> None:
    """Refuse to start when the job's disk cannot hold one more checkpoint of the size of the last one."""
    if resume_path is None:
        return  # a fresh run's checkpoint size is known once the model is built (RunnerBase checks it)
    needed = ckpt.checkpoint_bytes(resume_path)
    free = shutil.disk_usage(job_dir).free
    if free < needed:
        raise JobClaimError(f"not enough free space for a checkpoint in {job_dir}: {free / 2**20:.1f} MiB free, "
                            f"the last checkpoint ({resume_path.name}) took {needed / 2**20:.1f} MiB")


def load_config(args: argparse.Namespace) -> Config:
    """Merged, validated config; a ConfigError ends the process with its message (exit 2)."""
    try:
        return Config(args.cfg, options=args.options, plugins=args.plugins)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def build_runner(cfg: Config, job_id: str, resume_from: Path | None = None, checkpoint: str | None = None,
                 rank: int = 0) -> Any:
    """task -> datasets -> model (-> trainable weights from ``checkpoint``) -> runner, seeded as every
    run is: the same seed on all ranks while building (identical initial weights), then seed + rank."""
    run_cfg = cfg.run
    seed = int(run_cfg.get("seed", 42))
    seed_everything(seed)
    task = registry.tasks.get(run_cfg.task).setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    if checkpoint:
        ckpt.load_trainable_weights(model, checkpoint)
        logger.info("loaded trainable weights from %s", checkpoint)
    seed_everything(seed + rank)  # per-rank streams for dropout, augmentation, sampling
    runner_cls = registry.runners.get(run_cfg.get("runner") or "runner_base")
    return runner_cls(cfg, task, model, datasets, job_id, resume_from=resume_from)


def run(argv: Sequence[str] | None, training: bool, description: str = "") -> dict[str, Any]:
    """Parse ``argv``, then train (``training``) or evaluate; returns the final metrics.

    Exit statuses: ``EXIT_CONFIG`` for a config error (nothing built), ``EXIT_PREEMPTED`` after a stop signal
    (a checkpoint was written), ``EXIT_ERROR`` with a one-line cause for a job-directory, checkpoint or
    file-system error."""
    prog = "runners.train" if training else "runners.evaluate"
    args = build_parser(f"python -m {prog}", description, training).parse_args(argv)
    cfg = load_config(args)
    run_cfg = cfg.run
    for key in ("task",) + (("batch_size_train", "init_lr") if training and not run_cfg.get("evaluate") else ()):
        if run_cfg.get(key) is None:
            print(f"config error: run.{key} is required (set it in {args.cfg} or with --options run.{key}=...)",
                  file=sys.stderr)
            raise SystemExit(2)

    info = distributed.init_distributed(str(run_cfg.get("device", "cpu")),
                                        float(run_cfg.get("dist_timeout_minutes", 30) or 30))
    setup_logging(info.is_main)
    if args.print_config and info.is_main:
        print(cfg)
    lock = job_id = None
    fresh = True
    try:
        try:
            if getattr(args, "checkpoint", None):
                ckpt.check_weights_source(args.checkpoint)
            job_id, resume, lock = resolve_job(run_cfg, getattr(args, "resume", None) if training else None)
            fresh = resume is None
            if lock is not None:
                _check_free_space(lock.job_dir, resume)
            runner = build_runner(cfg, job_id, resume, getattr(args, "checkpoint", None), info.rank)
            with stop_signals(run_cfg.get("stop_signals", DEFAULT_STOP_SIGNALS) if training else ()):
                results = runner.train() if training and not run_cfg.get("evaluate") else runner.evaluate()
        except Preempted as stop:
            logger.warning("%s", stop)
            raise SystemExit(EXIT_PREEMPTED) from None
        except (JobClaimError, CheckpointError, BadMediaError) as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_ERROR) from None
        except OSError as err:
            print(f"error: {ckpt.os_error_cause(err)}", file=sys.stderr)
            raise SystemExit(EXIT_ERROR) from None
        except BaseException:
            if lock is not None and fresh and release_unused_job_dir(lock.job_dir):
                logger.warning("removed the job directory %s: the run wrote nothing to keep", lock.job_dir)
            raise
        if info.is_main:
            with open(runner.job_dir / "final_metrics.json", "w", encoding="utf-8") as fh:
                json.dump(results, fh, indent=1, default=str)
            print(json.dumps({"job_dir": str(runner.job_dir), "results": results}, default=str))
        return results
    finally:
        if lock is not None:
            lock.release()
        distributed.cleanup()
