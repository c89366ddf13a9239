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

import numpy as np
import torch

import registry
from common import dist as dist_utils
from runners import checkpointing as ckpt
from runners import distributed
from runners.config import Config, ConfigError, add_config_arguments
from runners.run_logging import new_job_id, setup_logging

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


def _latest_job_checkpoint(output_dir: Path) -> Path | None:
    """The newest resumable checkpoint among all jobs under ``output_dir``."""
    candidates = [c for job in output_dir.glob("*") if job.is_dir() and (c := ckpt.latest_checkpoint(job))]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def resolve_job(run_cfg: Any, resume: str | None) -> tuple[str, Path | None]:
    """(job id, checkpoint to resume from or None), decided on rank 0 and shared with all ranks."""
    if dist_utils.get_rank() == 0:
        output_dir = Path(str(run_cfg.get("output_dir", "output"))).expanduser()
        job_name = run_cfg.get("job_name")
        resume = resume if resume is not None else run_cfg.get("resume_ckpt_path")
        job_id, resume_path = job_name or new_job_id(), None
        if resume == "auto":
            resume_path = ckpt.latest_checkpoint(output_dir / job_name) if job_name else \
                _latest_job_checkpoint(output_dir)
            if resume_path is None:
                logger.warning("--resume auto: no checkpoint under %s; starting a fresh run", output_dir)
        elif resume:
            resume_path = Path(resume).expanduser()
            if not (resume_path / ckpt.STATE_FILE).is_file():
                raise FileNotFoundError(
                    f"resume checkpoint {resume_path} not found (expected a directory with {ckpt.STATE_FILE}, "
                    f"e.g. {output_dir}/<job>/checkpoints/step_00000100)")
        elif job_name and (output_dir / job_name).exists():
            raise FileExistsError(
                f"job directory {output_dir / job_name} exists; pass --resume auto to continue it or choose "
                f"another run.job_name")
        if resume_path is not None:
            job_id = resume_path.parent.parent.name
        decision = (job_id, str(resume_path) if resume_path else None)
    else:
        decision = None
    job_id, resume_path = dist_utils.broadcast_object(decision)
    return job_id, Path(resume_path) if resume_path else None


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
    """Parse ``argv``, then train (``training``) or evaluate; returns the final metrics."""
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
    try:
        job_id, resume = resolve_job(run_cfg, getattr(args, "resume", None)) if training else \
            resolve_job(run_cfg, None)
        runner = build_runner(cfg, job_id, resume, getattr(args, "checkpoint", None), info.rank)
        results = runner.train() if training and not run_cfg.get("evaluate") else runner.evaluate()
        if info.is_main:
            with open(runner.job_dir / "final_metrics.json", "w", encoding="utf-8") as fh:
                json.dump(results, fh, indent=1, default=str)
            print(json.dumps({"job_dir": str(runner.job_dir), "results": results}, default=str))
        return results
    finally:
        distributed.cleanup()
