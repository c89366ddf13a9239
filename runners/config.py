"""Run configuration: merge the four config layers with OmegaConf and validate every key.

Merge order (later wins):

    model zoo YAML of (model.arch, model.model_type)      models/configs/*.yaml   (model:, preprocess:)
  < each dataset builder's default YAML                     datasets/configs/*.yaml (datasets: {name: ...})
  < the project YAML                                        --cfg projects/...yaml
  < ``--options key=value ...``                             OmegaConf dotlist

Plugins named in the project YAML (``plugins: [...]``), in ``--options plugins=[...]`` or with
``--plugins`` are imported before any registry lookup, so plugin models/builders/tasks validate too.
Unknown keys in ``run:``, ``model:`` or a dataset node raise one ``ConfigError`` that lists every
problem with the file it came from and the valid keys (closest first). Nothing here builds a model
or touches data: it is pure config work, so errors surface before anything expensive happens.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import omegaconf
from omegaconf import DictConfig, ListConfig, OmegaConf

import registry
from common.paths import cache_root, resolve_storage_path  # noqa: F401 (resolve_storage_path: part of this module's API)
from models.base_model import model_config_keys
from registry import RegistryError

_omegaconf_version = tuple(int(p) for p in omegaconf.__version__.split(".")[:2])
TOP_LEVEL_KEYS = ("run", "model", "datasets", "preprocess", "plugins")


# --------------------------------------------------------------------------------------------------
# Storage paths
# --------------------------------------------------------------------------------------------------
def _cache_root_resolver(*parts: Any) -> str:
    return str(cache_root().joinpath(*map(str, parts)))


# ``${cache_root:coco/images}`` in any YAML resolves to <cache root>/coco/images at access time.
# (OmegaConf >= 2.4 names the new-style API register_resolver; 2.3 calls it register_new_resolver.)
_register = OmegaConf.register_resolver if _omegaconf_version >= (2, 4) else OmegaConf.register_new_resolver
_register("cache_root", _cache_root_resolver, replace=True)


# --------------------------------------------------------------------------------------------------
# The run schema: every key ``run:`` may hold, in one place
# --------------------------------------------------------------------------------------------------
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

STANDARD_DATASET_KEYS = (
    "data_type", "build_info", "vis_processor", "text_processor", "kw_processor", "type", "sample_ratio",
    "dataset_card",
)
PROCESSOR_SPLITS = ("train", "eval")


class ConfigError(ValueError):
    """A config file or option is wrong; the message names the key, the file and what is valid."""


def _unknown_key_message(path: str, key: str, valid: Iterable[str], source: str) -> str:
    valid = sorted(set(valid))
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown key '{path}' (from {source}).{hint} Valid keys: {', '.join(valid)}"


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    source: str  # a file path or "--options"
    cfg: DictConfig


def _load_yaml(path: str | os.PathLike, what: str) -> DictConfig:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{what} '{path}' does not exist")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and OmegaConf grammar errors
        raise ConfigError(f"{what} '{path}' is not valid YAML: {err}") from err
    if cfg is None:
        cfg = OmegaConf.create()
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{what} '{path}' must hold a mapping at the top level, got a list")
    return cfg


def _parse_options(options: Sequence[str] | None) -> DictConfig:
    options = list(options or [])
    bad = [o for o in options if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"--options takes key=value pairs (e.g. run.batch_size_train=8); got {bad}")
    try:
        return OmegaConf.from_dotlist(options)
    except Exception as err:
        raise ConfigError(f"cannot parse --options {options}: {err}") from err


def _node(cfg: DictConfig | None, *keys: str) -> Any:
    """cfg[k1][k2]... or None when any level is missing (no interpolation is resolved)."""
    for key in keys:
        if not isinstance(cfg, DictConfig) or key not in cfg:
            return None
        cfg = cfg._get_node(key)  # raw node: keeps "${...}" unresolved
        cfg = cfg if isinstance(cfg, (DictConfig, ListConfig)) else cfg._value()
    return cfg


def _keys(node: Any) -> list[str]:
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _plugin_names(node: Any, source: str) -> list[str]:
    if node is None:
        return []
    if isinstance(node, str):
        return [node]
    if isinstance(node, ListConfig) and all(isinstance(v, str) for v in node):
        return list(node)
    raise ConfigError(f"'plugins' (from {source}) must be a list of module names, got {node!r}")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
class Config:
    """The merged, validated run configuration.

    ``Config("projects/blip2/stage2.yaml", options=["run.batch_size_train=8"], plugins=["my.module"])``
    gives ``.run``, ``.model``, ``.datasets``, ``.preprocess`` (DictConfig nodes), ``.config`` (all of
    it), ``.to_dict()``, ``.save(path)`` and a readable ``str()``.
    """

    def __init__(
        self,
        cfg_path: str | os.PathLike,
        options: Sequence[str] | None = None,
        plugins: Sequence[str] | None = None,
    ) -> None:
        self.cfg_path = os.fspath(cfg_path)
        project = _Layer(self.cfg_path, _load_yaml(self.cfg_path, "project config"))
        user_options = _Layer("--options", _parse_options(options))
        self._check_top_level([project, user_options])
        for layer in (project, user_options):  # "coco_caption:" with nothing under it means "the defaults"
            datasets = _node(layer.cfg, "datasets")
            for name in _keys(datasets):
                if _node(datasets, name) is None:
                    datasets[name] = {}

        self.plugins = _plugin_names(_node(project.cfg, "plugins"), project.source)
        self.plugins += _plugin_names(_node(user_options.cfg, "plugins"), "--options")
        self.plugins += list(plugins or [])
        try:
            registry.load_plugins(self.plugins)
        except registry.PluginNotFoundError as err:
            raise ConfigError(f"{err} (plugins of {self.cfg_path}: {self.plugins})") from err

        user = OmegaConf.merge(project.cfg, user_options.cfg)
        self.model_type: str | None = None  # set by _model_layers (the project's or the class default)
        self.model_cls: type | None = None  # set by _model_layers
        user_layers = [project, user_options]
        errors: list[str] = []
        model_layers, model_keys = self._model_layers(user, errors)
        dataset_layers, dataset_keys = self._dataset_layers(user, errors)
        if errors:  # cannot merge without the zoo/builder files
            raise ConfigError(self._format_errors(errors))

        self.layers = model_layers + dataset_layers + user_layers
        merged = OmegaConf.merge(*(layer.cfg for layer in self.layers))
        _replace_encoder_kwargs(merged, user, self.layers[: len(model_layers)])
        if self.model_type is not None:
            merged.model.model_type = self.model_type  # record the default, if that is what was used
        if self.plugins:
            merged.plugins = list(dict.fromkeys(self.plugins))
        self.config: DictConfig = merged

        self._validate_run(errors)
        self._validate_section("model", model_keys, errors)
        self._validate_qformer(errors)
        self._validate_model_choices(errors)
        for name, valid in dataset_keys.items():
            self._validate_section(f"datasets.{name}", valid, errors)
        self._validate_processors(errors)
        self._validate_null_splits(errors)
        if errors:
            raise ConfigError(self._format_errors(errors))

    # -- construction helpers ---------------------------------------------------------------
    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Config":
        """Build from the namespace of a parser prepared by ``add_config_arguments``."""
        return cls(args.cfg, options=args.options, plugins=args.plugins)

    def _format_errors(self, errors: list[str]) -> str:
        head = f"{len(errors)} problem(s) in the configuration of {self.cfg_path}:"
        return "\n".join([head] + [f"  - {e}" for e in errors])

    def _check_top_level(self, layers: list[_Layer]) -> None:
        errors = [
            _unknown_key_message(key, key, TOP_LEVEL_KEYS, layer.source)
            for layer in layers
            for key in _keys(layer.cfg)
            if key not in TOP_LEVEL_KEYS
        ]
        if errors:
            raise ConfigError(self._format_errors(errors))

    def _model_layers(self, user: DictConfig, errors: list[str]) -> tuple[list[_Layer], set[str] | None]:
        """The model zoo layer (model:, preprocess:) and the valid model keys."""
        model = _node(user, "model")
        if model is None:
            return [], None
        arch = model.get("arch")
        if not arch:
            errors.append(f"model.arch is missing (set it in {self.cfg_path} or with --options model.arch=NAME)")
            return [], None
        try:
            model_cls = registry.models.get(arch)
        except RegistryError as err:
            errors.append(f"model.arch: {err}")
            return [], None
        self.model_cls = model_cls
        valid = set(model_config_keys(model_cls))  # derived from the model's constructor signature
        zoo = dict(getattr(model_cls, "PRETRAINED_MODEL_CONFIG_DICT", {}) or {})
        if not zoo:
            return [], valid
        model_type = model.get("model_type") or getattr(model_cls, "DEFAULT_MODEL_TYPE", None)
        if model_type is None and len(zoo) == 1:
            model_type = next(iter(zoo))
        if model_type not in zoo:
            given = "missing" if model_type is None else f"'{model_type}' is unknown"
            errors.append(f"model.model_type {given} for arch '{arch}'; model types: {', '.join(zoo)}")
            return [], None
        self.model_type = model_type
        layers = []
        for zoo_type in zoo:
            path = os.fspath(model_cls.default_config_path(zoo_type))
            cfg = _load_yaml(path, f"model zoo config of {arch}/{zoo_type}")
            if not hasattr(model_cls, "config_keys"):  # a plugin without BaseModel: its zoo YAMLs name keys too
                valid |= set(_keys(_node(cfg, "model")))
            if zoo_type == self.model_type:
                layers.append(_Layer(path, cfg))
        return layers, valid

    def _dataset_layers(self, user: DictConfig, errors: list[str]) -> tuple[list[_Layer], dict[str, set[str]]]:
        """One default-YAML layer per dataset builder, and the valid keys per dataset."""
        datasets = _node(user, "datasets")
        if datasets is None:
            return [], {}
        if not isinstance(datasets, DictConfig):
            errors.append(f"'datasets' must map builder names to their options, got {datasets!r}")
            return [], {}
        layers, valid_keys = [], {}
        for name in _keys(datasets):
            try:
                builder_cls = registry.builders.get(name)
            except RegistryError as err:
                errors.append(f"datasets.{name}: {err}")
                continue
            node = _node(datasets, name)
            ds_type = (node.get("type") if isinstance(node, DictConfig) else None) or "default"
            valid = set(STANDARD_DATASET_KEYS) | set(getattr(builder_cls, "EXTRA_CONFIG_KEYS", ()))
            types = dict(getattr(builder_cls, "DATASET_CONFIG_DICT", {}) or {})
            if types and ds_type not in types:
                errors.append(f"datasets.{name}.type '{ds_type}' is unknown; types: {', '.join(types)}")
                continue
            for type_name in types:
                path = os.fspath(builder_cls.default_config_path(type_name))
                cfg = _load_yaml(path, f"default config of dataset {name} ({type_name})")
                entries = _node(cfg, "datasets")
                if not isinstance(entries, DictConfig) or not entries:
                    errors.append(f"dataset default config '{path}' must hold 'datasets: {{{name}: ...}}'")
                    continue
                key = name if name in entries else (_keys(entries)[0] if len(entries) == 1 else None)
                if key is None:
                    errors.append(f"dataset default config '{path}' has no entry '{name}' under 'datasets'")
                    continue
                valid |= set(_keys(_node(entries, key)))
                if type_name == ds_type:
                    layers.append(_Layer(path, OmegaConf.create({"datasets": {name: entries[key]}})))
            valid_keys[name] = valid
        return layers, valid_keys

    # -- validation ----------------------------------------------------------------------------
    def _source_of(self, *keys: str) -> str:
        """The last layer that sets cfg[keys...]: the file (or --options) to blame."""
        for layer in reversed(self.layers):
            if _has_key(layer.cfg, keys):
                return layer.source
        return "defaults"

    def run_schema(self) -> dict[str, RunKey]:
        """RUN_SCHEMA plus the ``RUN_KEYS`` the selected task and runner classes declare."""
        schema = dict(RUN_SCHEMA)
        run = self.config.get("run") or {}
        lookups = [("tasks", run.get("task"), True), ("runners", run.get("runner"), True)]
        if run.get("runner") is None:
            lookups.append(("runners", "runner_base", False))
        for kind, name, required in lookups:
            if name is None:
                continue
            try:
                cls = registry.ALL[kind].get(name)
            except RegistryError:
                if required:
                    raise
                continue  # the default runner is not registered: nothing to add
            for key, spec in dict(getattr(cls, "RUN_KEYS", {}) or {}).items():
                if not isinstance(spec, RunKey):
                    checks = TASK_KEY_CHECKS.get(key)
                    spec = dataclasses.replace(checks, help=str(spec)) if checks else RunKey(str(spec))
                schema[key] = spec
        return schema

    def _validate_run(self, errors: list[str]) -> None:
        run = _node(self.config, "run")
        if run is None:
            return
        bad_names = False
        for key, kind in (("task", "tasks"), ("runner", "runners"), ("lr_sched", "lr_schedulers")):
            name = run.get(key)
            if isinstance(name, str):
                try:
                    registry.ALL[kind].get(name)
                except RegistryError as err:
                    errors.append(f"run.{key} (from {self._source_of('run', key)}): {err}")
                    bad_names = bad_names or key != "lr_sched"
        if bad_names:  # the task/runner decides which extra run keys are valid
            return
        schema = self.run_schema()
        for key in _keys(run):
            source = self._source_of("run", key)
            if key not in schema:
                if key in NOT_READ_RUN_KEYS:
                    errors.append(f"run.{key} (from {source}) is not read by anything here: {NOT_READ_RUN_KEYS[key]}; "
                                  f"remove it")
                else:
                    errors.append(_unknown_key_message(f"run.{key}", key, schema, source))
                continue
            value = _node(run, key)
            errors.extend(_check_run_value(key, value, schema[key], source))

    def _validate_section(self, dotted: str, valid: set[str] | None, errors: list[str]) -> None:
        keys = dotted.split(".")
        node = _node(self.config, *keys)
        if valid is None or not isinstance(node, DictConfig):
            return
        for key in _keys(node):
            if key not in valid:
                errors.append(_unknown_key_message(f"{dotted}.{key}", key, valid, self._source_of(*keys, key)))

    def _validate_qformer(self, errors: list[str]) -> None:
        """``model.qformer`` names a registered Q-Former; ``model.qformer_config`` holds only its config's keys."""
        model = _node(self.config, "model")
        if not isinstance(model, DictConfig) or not ({"qformer", "qformer_config"} & set(_keys(model))):
            return
        try:
            model_cls = registry.models.get(model.get("arch"))
            name = model.get("qformer") or getattr(model_cls, "DEFAULT_QFORMER", "bert_qformer")
            qformer_cls = registry.qformers.get(name)
        except RegistryError as err:
            errors.append(f"model.qformer (from {self._source_of('model', 'qformer')}): {err}")
            return
        config_class = getattr(qformer_cls, "config_class", None)
        if config_class is not None and dataclasses.is_dataclass(config_class):
            self._validate_section("model.qformer_config", {f.name for f in dataclasses.fields(config_class)}, errors)

    def _validate_model_choices(self, errors: list[str]) -> None:
        """Values the model class restricts: ``CONFIG_CHOICES`` {key: allowed values} (one definition, also
        checked by its constructor)."""
        model = _node(self.config, "model")
        if self.model_cls is None or not isinstance(model, DictConfig):
            return
        for key, allowed in dict(getattr(self.model_cls, "CONFIG_CHOICES", {}) or {}).items():
            value = _node(model, key)
            if value is not None and value not in allowed:
                errors.append(f"model.{key} (from {self._source_of('model', key)}) must be one of "
                              f"{', '.join(map(str, allowed))}, got {value!r}")

    def _validate_null_splits(self, errors: list[str]) -> None:
        """``build_info.annotations.<split>: null`` switches a default split off; using that split is an error."""
        run = _node(self.config, "run")
        used = {}
        for key in ("train_splits", "valid_splits", "test_splits"):
            value = _node(run, key) if isinstance(run, DictConfig) else None
            for split in ([value] if isinstance(value, str) else list(value or [])):
                used.setdefault(str(split), key)
        for name in _keys(_node(self.config, "datasets")):
            annotations = _node(self.config, "datasets", name, "build_info", "annotations")
            for split in _keys(annotations):
                if _node(annotations, split) is None and split in used:
                    errors.append(f"datasets.{name}.build_info.annotations.{split} (from "
                                  f"{self._source_of('datasets', name, 'build_info', 'annotations', split)}) is null, "
                                  f"which switches that split off, but run.{used[split]} uses it")

    def _validate_processors(self, errors: list[str]) -> None:
        """Processor nodes (datasets.*.{vis,text}_processor.{train,eval}, preprocess.*) name real processors."""
        from processors import check_processor_keys  # imported here: torchvision is not needed before

        places = [("preprocess",)] + [("datasets", name) for name in _keys(_node(self.config, "datasets"))]
        for base in places:
            for proc_kind in ("vis_processor", "text_processor"):
                node = _node(self.config, *base, proc_kind)
                if not isinstance(node, DictConfig):
                    continue
                for split in _keys(node):
                    path = (*base, proc_kind, split)
                    dotted = ".".join(path)
                    source = self._source_of(*path)
                    if split not in PROCESSOR_SPLITS:
                        errors.append(_unknown_key_message(dotted, split, PROCESSOR_SPLITS, source))
                        continue
                    proc = _node(self.config, *path)
                    if not isinstance(proc, DictConfig) or not proc.get("name"):
                        errors.append(f"{dotted} (from {source}) needs a 'name' (a registered processor)")
                        continue
                    try:
                        proc_cls = registry.processors.get(proc.name)
                    except RegistryError as err:
                        errors.append(f"{dotted}.name (from {source}): {err}")
                        continue
                    errors.extend(check_processor_keys(proc_cls, set(_keys(proc)), where=f"{dotted} (from {source})"))

    # -- access ------------------------------------------------------------------------------------
    @property
    def run(self) -> DictConfig:
        return self.config.get("run") or OmegaConf.create()

    @property
    def model(self) -> DictConfig:
        return self.config.get("model") or OmegaConf.create()

    @property
    def datasets(self) -> DictConfig:
        return self.config.get("datasets") or OmegaConf.create()

    @property
    def preprocess(self) -> DictConfig:
        return self.config.get("preprocess") or OmegaConf.create()

    # LAVIS spellings, for users porting code.
    run_cfg = run
    model_cfg = model
    datasets_cfg = datasets

    def to_dict(self, resolve: bool = True) -> dict[str, Any]:
        """Plain nested dict (interpolations such as ``${oc.env:...}`` resolved by default)."""
        return OmegaConf.to_container(self.config, resolve=resolve)  # type: ignore[return-value]

    def save(self, path: str | os.PathLike, resolve: bool = True) -> Path:
        """Write the merged config as YAML (it can be passed back with --cfg)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, path, resolve=resolve)
        return path

    def __str__(self) -> str:
        lines = ["Config merged from (later wins):"] + [f"  {layer.source}" for layer in self.layers]
        for section in TOP_LEVEL_KEYS:
            if section in self.config:
                node = OmegaConf.create({section: self.config._get_node(section)})
                try:
                    text = OmegaConf.to_yaml(node, resolve=True)
                except Exception:  # an unresolvable interpolation: show it as written
                    text = OmegaConf.to_yaml(node)
                lines += [f"===== {section} =====", text.rstrip()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Config({self.cfg_path!r}, arch={self.model.get('arch')!r}, datasets={_keys(self.datasets)})"


def _replace_encoder_kwargs(merged: DictConfig, user: DictConfig, model_layers: Sequence[_Layer]) -> None:
    """``model.vit_kwargs`` naming another timm ``model_name`` than the model defaults replaces them instead of
    merging key by key: one model's constructor arguments (``embed_dim``, ``depth``) mean nothing to another."""
    user_kwargs = _node(user, "model", "vit_kwargs")
    if user_kwargs is None or "model_name" not in user_kwargs:
        return
    default_names = [_node(layer.cfg, "model", "vit_kwargs", "model_name") for layer in model_layers]
    default_names = [name for name in default_names if name is not None]
    if default_names and default_names[-1] != user_kwargs.model_name:
        merged.model.vit_kwargs = user_kwargs


def _has_key(cfg: DictConfig, keys: Sequence[str]) -> bool:
    """True when the (possibly null-valued) key path exists in cfg."""
    node: Any = cfg
    for key in keys:
        if not isinstance(node, DictConfig) or key not in node:
            return False
        node = node._get_node(key)
        node = node if isinstance(node, (DictConfig, ListConfig)) else None
    return True


def _check_run_value(key: str, value: Any, spec: RunKey, source: str) -> list[str]:
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


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--cfg``, ``--options`` and ``--plugins`` (shared by runners.train and runners.evaluate)."""
    parser.add_argument("--cfg", "--cfg-path", dest="cfg", required=True, metavar="YAML",
                        help="project YAML, e.g. projects/blip2/stage2.yaml")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. run.batch_size_train=8 model.prompt='a photo of'")
    parser.add_argument("--plugins", nargs="+", default=[], metavar="MODULE",
                        help="import these modules before building anything (they register components)")
    return parser
