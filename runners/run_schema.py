"""The ``run:`` schema: every key a run may hold, its type and range, in one place.

``RUN_SCHEMA`` holds the keys every run accepts; a task or runner adds its own through ``RUN_KEYS`` (a
``RunKey``, or a help string that ``TASK_KEY_CHECKS`` types). ``check_run_value`` checks one value against its
``RunKey`` and returns the problems as messages naming the key and the file it came from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


@dataclass(frozen=True)
class RunKey:
    """Documentation and checks for one ``run:`` key (null is accepted only when ``types`` allows NoneType)."""

    help: str
    types: tuple[type, ...] | None = None  # allowed Python types of the value (None: anything)
    choices: tuple[Any, ...] | None = None  # allowed values (strings compared case-insensitively)
    low: float | None = None  # smallest allowed value (numbers)
    high: float | None = None  # largest allowed value (numbers)
    open_low: bool = False  # exclude ``low`` itself (e.g. a learning rate must be > 0)
    items: tuple[Any, ...] | None = None  # allowed elements of a list value


_NUM, _INT, _BOOL, _STR, _LIST = (int, float), (int,), (bool,), (str,), (list, ListConfig, str)
_NONE = (type(None),)


def _count(help: str, low: int = 1) -> RunKey:
    return RunKey(help, _INT, low=low)


def _rate(help: str) -> RunKey:
    return RunKey(help, _NUM, low=0.0, open_low=True)


def _fraction(help: str, **kw: Any) -> RunKey:
    return RunKey(help, _NUM, low=0.0, high=1.0, **kw)


# Keys LAVIS configs carry that nothing here reads: refused with the reason instead of accepted and ignored.
NOT_READ_RUN_KEYS = {
    "itm_negatives": "the ITM negatives are a model option: set model.itm_negatives (multinomial | hardest)",
    "distributed": "a run is distributed when torchrun or srun launch more than one process",
    "world_size": "the launcher (torchrun, SLURM) sets the number of processes",
    "dist_url": "the process group is initialised from the launcher's variables (MASTER_ADDR/MASTER_PORT)",
    "dist_backend": "the backend is nccl on GPU and gloo on CPU",
    "rank": "the launcher sets each process's rank",
    "gpu": "the launcher's LOCAL_RANK picks the GPU",
    "save_last": "the last step checkpoint is always kept (run.keep_last_ckpts)",
    "compile": "torch.compile is not applied by the runner",
    "num_captions": "captioning returns one caption per image",
    "img_ids": "evaluation runs on the whole split",
}

RUN_SCHEMA: dict[str, RunKey] = {
    # what runs
    "task": RunKey("registered task (registry.tasks)", _STR),
    "runner": RunKey("registered runner (registry.runners), default runner_base", _STR),
    "job_name": RunKey("name of the job; the output directory is output_dir/<job_name or job id> (null: a new job id)",
                       _STR + _NONE),
    "evaluate": RunKey("only evaluate test_splits, no training", _BOOL),
    "train_splits": RunKey("splits used for training", _LIST),
    "valid_splits": RunKey("splits evaluated every val_freq epochs (best checkpoint by agg_metrics)", _LIST),
    "test_splits": RunKey("splits evaluated at the end with the best checkpoint", _LIST),
    # optimisation
    "lr_sched": RunKey("registered LR schedule (registry.lr_schedulers)", _STR),
    "init_lr": _rate("peak learning rate"),
    "min_lr": RunKey("final learning rate of the cosine decay", _NUM, low=0.0),
    "warmup_lr": RunKey("learning rate at step 0 of the warmup (-1: init_lr)", _NUM, low=-1.0),
    "warmup_steps": _count("linear warmup length in optimizer steps", low=0),
    "lr_decay_rate": _rate("decay per epoch of linear_warmup_step_lr"),
    "weight_decay": RunKey("AdamW weight decay (not applied to biases, norms, 1-d params)", _NUM, low=0.0),
    "lr_layer_decay": _fraction("layer-wise LR decay for a trainable ViT (1: off)", open_low=True),
    "lr_scales": RunKey("LR factor per parameter-name prefix, e.g. {Qformer: 0.1} (factor >= 0; none: every "
                        "parameter at the scheduled LR)", (dict, DictConfig) + _NONE),
    "beta1": _fraction("AdamW beta1"),
    "beta2": _fraction("AdamW beta2"),
    "grad_clip": RunKey("max gradient norm (null/0: no clipping)", _NUM + _NONE, low=0.0),
    "accum_grad_iters": _count("gradient accumulation micro-steps per optimizer step"),
    "amp": RunKey("mixed precision", (str, bool), ("bf16", "fp16", "off", "true", "false", True, False)),
    "max_epoch": _count("epochs (runner_base)"),
    "max_iters": _count("total iterations (runner_iter)"),
    "iters_per_inner_epoch": _count("iterations between evaluations/checkpoints (runner_iter)"),
    "train_dataset_ratios": RunKey("sampling weight per training dataset {name: ratio}"),
    "cache_image_features": RunKey("cache frozen image-encoder outputs between epochs", _BOOL),
    "feature_cache_dir": RunKey("directory of that cache (default: <cache root>/feature_cache)", _STR),
    # data loading
    "batch_size_train": _count("per-process training batch size"),
    "batch_size_eval": _count("per-process evaluation batch size"),
    "num_workers": _count("DataLoader workers per process", low=0),
    "use_dist_eval_sampler": RunKey("split evaluation data across ranks", _BOOL),
    # reproducibility, resume, output
    "seed": _count("random seed (each rank adds its rank)", low=0),
    "output_dir": RunKey("root of job directories (relative paths: relative to the working dir)", _STR),
    "resume_ckpt_path": RunKey("checkpoint to resume from ('auto': latest in the job dir)", _STR + _NONE),
    "save_freq": RunKey("save a checkpoint every N epochs (<=0: off)", _INT),
    "val_freq": _count("evaluate valid_splits every N epochs"),
    "log_freq": _count("log every N steps"),
    "tensorboard": RunKey("also write TensorBoard events", _BOOL),
    "stop_signals": RunKey("signals that stop a run gracefully: finish the step, checkpoint, exit with status 75",
                           (list, ListConfig), items=("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGQUIT")),
    "report_metric": RunKey("compute metrics (false: only write results)", _BOOL),
    # devices and distribution
    "device": RunKey("cuda | cpu | cuda:N | auto", _STR),
    "fsdp": RunKey("shard the model with torch FSDP (bool or an options mapping)"),
}

# Types and ranges of keys that only the tasks declaring them in RUN_KEYS accept.
TASK_KEY_CHECKS: dict[str, RunKey] = {
    "num_beams": _count("beam width"),
    "max_len": _count("max generated tokens"),
    "min_len": _count("min generated tokens", low=0),
    "length_penalty": RunKey("beam-search length penalty", _NUM),
    "repetition_penalty": _rate("generation repetition penalty"),
    "use_nucleus_sampling": RunKey("sample instead of beam search", _BOOL),
    "top_p": _fraction("nucleus sampling p", open_low=True),
    "temperature": _rate("sampling temperature"),
    "prompt": RunKey("text prompt; VQA prompts contain '{}' for the question", _STR + _NONE),
    "inference_method": RunKey("VQA answer inference", _STR, ("generate", "rank")),
    "num_ans_candidates": _count("candidates kept for answer ranking"),
    "answer_list": RunKey("file with the candidate answers for ranking", _STR + _NONE),
    "apply_lemmatizer": RunKey("lemmatise predicted answers (OK-VQA)", _BOOL),
    "k_test": _count("retrieval: top-k candidates re-ranked by ITM"),
    "annotation_file": RunKey("ground-truth file for caption scoring", _STR + _NONE),
}


def check_run_value(key: str, value: Any, spec: RunKey, source: str) -> list[str]:
    if isinstance(value, str) and OmegaConf.is_interpolation(OmegaConf.create({"v": value}), "v"):
        return []  # checked when resolved by its user
    if value is None:
        if spec.types is None or type(None) in spec.types:
            return []
        expected = " or ".join(t.__name__ for t in spec.types)
        return [f"run.{key} (from {source}) is null; it must be {expected} ({spec.help}) or be left out"]
    wrong_type = spec.types is not None and (
        not isinstance(value, spec.types) or (isinstance(value, bool) and bool not in spec.types)
    )
    if wrong_type:
        expected = " or ".join(t.__name__ for t in spec.types)  # type: ignore[union-attr]
        return [f"run.{key} (from {source}) must be {expected} ({spec.help}), got {value!r}"]
    if spec.choices is not None:
        normalised = value.lower() if isinstance(value, str) else value
        if normalised not in spec.choices:
            shown = ", ".join(str(c) for c in spec.choices)
            return [f"run.{key} (from {source}) must be one of {shown}, got {value!r}"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        too_low = spec.low is not None and (value < spec.low or (spec.open_low and value == spec.low))
        too_high = spec.high is not None and value > spec.high
        if too_low or too_high or value != value:  # value != value: NaN
            low = "" if spec.low is None else f"{'>' if spec.open_low else '>='} {spec.low:g}"
            high = "" if spec.high is None else f"<= {spec.high:g}"
            return [f"run.{key} (from {source}) must be {' and '.join(filter(None, (low, high)))} ({spec.help}), "
                    f"got {value!r}"]
    if spec.items is not None and isinstance(value, (list, ListConfig)):
        bad = [v for v in value if str(v).upper() not in spec.items]
        if bad:
            return [f"run.{key} (from {source}): {bad} not allowed; choose from {', '.join(spec.items)}"]
    return []
