"""The task base class: builds model and datasets from a config, runs train / eval steps, and
merges evaluation results across ranks.

A task is the part of a run that knows what the model is asked to do (pre-train, caption,
answer, retrieve) and how that is scored; the runner owns the loop, the optimizer and the
process group. Every method here works without ``torch.distributed`` and never touches it
unless a process group is initialised.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

import registry
from common.device import module_device, move_to_device
from common.dist import barrier, broadcast_object, get_rank, get_world_size, is_main_process

logger = logging.getLogger(__name__)


# -- small helpers -----------------------------------------------------------------------------
def run_section(cfg: Any) -> DictConfig:
    """The ``run:`` section of a Config / DictConfig (or the node itself if it already is one)."""
    for name in ("run", "run_cfg"):
        section = getattr(cfg, name, None) if not isinstance(cfg, Mapping) else cfg.get(name)
        if section is not None:
            return section if isinstance(section, DictConfig) else OmegaConf.create(section)
    if cfg is None:
        return OmegaConf.create({})
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))


def _section(cfg: Any, name: str) -> Any:
    section = cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)
    if section is None:
        raise KeyError(f"config has no '{name}:' section (needed to build the {name.rstrip('s')})")
    return section


def to_jsonable(value: Any) -> Any:
    """Python scalars for tensors / numpy values so results can be written as JSON."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def id_value(value: Any) -> Any:
    """An id as an int when it is int-like (tensor, numpy, canonical digit string such as "42"),
    else unchanged; "021234" stays a string (GQA ids keep their leading zeros)."""
    value = to_jsonable(value)
    if isinstance(value, str) and value.isdigit() and str(int(value)) == value:
        return int(value)
    return value


def call_with_supported_kwargs(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with only the keyword options its signature accepts; warn about dropped ones.

    Stage-1 and stage-2 models have different decoding options (e.g. the Q-Former caption
    decoder has no ``length_penalty``); the task config is shared, so unknown options are
    dropped with a warning instead of crashing the evaluation.
    """
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(*args, **kwargs)
    accepted = {k: v for k, v in kwargs.items() if k in params}
    dropped = sorted(set(kwargs) - set(accepted))
    if dropped:
        logger.warning("%s does not accept %s; these options are ignored", getattr(fn, "__qualname__", fn), dropped)
    return fn(*args, **accepted)


class BaseTask:
    """What every task shares. Subclasses override ``valid_step`` and ``after_evaluation``.

    ``run_cfg`` is the run section of the config; ``output_dir`` is where result files go
    (``run.output_dir`` by default; the runner sets the job directory with ``set_output_dir``).
    """

    #: whether the runner may shard evaluation data across ranks (retrieval needs every image)
    split_eval_across_ranks: bool = True

    def __init__(self, run_cfg: DictConfig | None = None) -> None:
        self.run_cfg = run_cfg if run_cfg is not None else OmegaConf.create({})
        output_dir = self.run_cfg.get("output_dir")
        self.output_dir: Path | None = Path(output_dir) if output_dir else None
        self.eval_dataset: Any = None  # dataset of the latest evaluation() call
        self.eval_name: str | None = None  # its name, when the runner gives it (before_evaluation)
        # False: only write the results (e.g. a test-dev split without answers, for a leaderboard)
        self.report_metric = bool(self.run_cfg.get("report_metric", True))

    @classmethod
    def setup_task(cls, cfg: Any) -> "BaseTask":
        """Build the task from a Config (or its run section)."""
        return cls(run_cfg=run_section(cfg))

    def set_output_dir(self, path: str | os.PathLike) -> None:
        self.output_dir = Path(path)

    @property
    def result_dir(self) -> Path:
        if self.output_dir is None:
            raise ValueError("task has no output directory: set run.output_dir or call task.set_output_dir(path)")
        return self.output_dir / "result"

    # -- building -------------------------------------------------------------------------------
    def build_model(self, cfg: Any) -> torch.nn.Module:
        """``registry.models.get(cfg.model.arch).from_config(cfg.model)``."""
        model_cfg = _section(cfg, "model")
        arch = model_cfg.get("arch")
        if not arch:
            raise KeyError("model.arch is missing: the model section must name a registered architecture")
        from models.zoo import check_weight_sources  # models (transformers: seconds) loads with the first model

        # every weight source resolved before anything is built: offline, all missing ones in one message at once
        check_weight_sources(arch, model_cfg, label=f"{arch}/{model_cfg.get('model_type', 'custom')}")
        return registry.models.get(arch).from_config(model_cfg)

    def build_datasets(self, cfg: Any) -> dict[str, dict[str, Any]]:
        """{dataset name: {split: Dataset}} from each dataset node via its registered builder.

        A node may set ``builder: <registered name>`` to use a builder under another name
        (e.g. two ``image_text_pairs`` datasets in one run).
        """
        datasets_cfg = _section(cfg, "datasets")
        if len(datasets_cfg) == 0:
            raise ValueError("the datasets section is empty: name at least one dataset builder")
        out: dict[str, dict[str, Any]] = {}
        for name, node in datasets_cfg.items():
            builder_name = node.get("builder", name) if node is not None else name
            builder = registry.builders.get(builder_name)(node)
            out[name] = builder.build_datasets()
        return out

    # -- steps ----------------------------------------------------------------------------------
    def train_step(self, model: torch.nn.Module, samples: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward the model; returns (loss, {every loss term as float})."""
        output = model(samples)
        if "loss" not in output:
            raise KeyError(f"{type(model).__name__}.forward returned no 'loss' (keys: {sorted(output)})")
        logs = {
            k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
            for k, v in output.items()
            if "loss" in k and v is not None and (not isinstance(v, torch.Tensor) or v.numel() == 1)
        }
        return output["loss"], logs

    def before_evaluation(self, model: torch.nn.Module, dataset: Any, name: str | None = None) -> None:
        """Remember the dataset about to be evaluated (its ground truth is scored against) and,
        when given, its name, which then prefixes the result files (several datasets may share a
        split name in one run)."""
        self.eval_dataset = dataset
        self.eval_name = name

    def result_name(self, split: str, epoch: Any, suffix: str = "") -> str:
        """``[<dataset name>_]<split>_epoch<epoch><suffix>``: the stem of a result file."""
        prefix = f"{self.eval_name}_" if self.eval_name else ""
        return f"{prefix}{split}_epoch{epoch}{suffix}"

    def valid_step(self, model: torch.nn.Module, samples: dict) -> list[dict]:
        raise NotImplementedError(f"{type(self).__name__} does not evaluate (no valid_step)")

    @torch.no_grad()
    def evaluation(self, model: torch.nn.Module, data_loader: Iterable) -> list[dict]:
        """Run ``valid_step`` over this rank's share of the loader; returns this rank's records."""
        self.eval_dataset = getattr(data_loader, "dataset", self.eval_dataset)
        was_training = model.training
        model.eval()
        device = module_device(model)
        results: list[dict] = []
        try:
            for samples in data_loader:
                results.extend(self.valid_step(model, move_to_device(samples, device)))
        finally:
            model.train(was_training)
        return results

    def after_evaluation(self, results: Any, split: str, epoch: Any) -> dict[str, Any]:
        """Score merged results; every task returns a dict with ``agg_metrics``."""
        raise NotImplementedError(f"{type(self).__name__} does not score evaluations")

    # -- results across ranks ---------------------------------------------------------------------
    def merge_results(self, results: list[dict], name: str, dedup_key: str | None = None) -> list[dict] | None:
        """Write this rank's records to ``result/<name>_rank<r>.json``; rank 0 merges them into
        ``result/<name>.json`` (dropping repeated ``dedup_key`` values) and returns the merged
        list; other ranks return None. Assumes a file system shared by the ranks.
        """
        result_dir = self.result_dir
        rank, world = get_rank(), get_world_size()
        records = [{k: to_jsonable(v) for k, v in r.items()} for r in results]
        if world == 1:
            merged = records
        else:
            result_dir.mkdir(parents=True, exist_ok=True)
            write_json(records, result_dir / f"{name}_rank{rank}.json")
            barrier()
            if rank != 0:
                return None
            merged = []
            for r in range(world):
                part = result_dir / f"{name}_rank{r}.json"
                with open(part) as f:
                    merged.extend(json.load(f))
                part.unlink()
        if dedup_key is not None:
            seen, unique = set(), []
            for rec in merged:
                key = rec.get(dedup_key)
                if key not in seen:
                    seen.add(key)
                    unique.append(rec)
            merged = unique
        write_json(merged, result_dir / f"{name}.json")
        return merged

    def unscored(self, merged: list[dict] | None, split: str, epoch: Any) -> dict[str, Any]:
        """Metrics of a run with ``report_metric: false``: where the results are, no scores."""
        info = None
        if merged is not None:
            result_file = self.result_dir / f"{self.result_name(split, epoch)}.json"
            info = {"num_results": len(merged), "result_file": str(result_file)}
        return self.finish_metrics(info, split, epoch)

    def finish_metrics(self, metrics: dict[str, Any] | None, split: str, epoch: Any) -> dict[str, Any]:
        """Write rank 0's metrics next to the results and give every rank the same dict."""
        if is_main_process() and metrics is not None:
            write_json(metrics, self.result_dir / f"{self.result_name(split, epoch, '_metrics')}.json")
            logger.info("%s %s epoch %s: %s", type(self).__name__, split, epoch,
                        {k: v for k, v in metrics.items() if not isinstance(v, dict)})
        return broadcast_object(metrics)


def write_json(obj: Any, path: Path) -> None:
    """Write JSON atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)
