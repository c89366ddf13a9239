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
import os
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

import registry
from models.base_model import model_config_keys
from registry import RegistryError
from runners.config_layers import (ConfigError, Layer, get_node, has_key, load_yaml, node_keys, parse_options,
                                   plugin_names, unknown_key_message)
from runners.run_schema import NOT_READ_RUN_KEYS, RUN_SCHEMA, TASK_KEY_CHECKS, RunKey, check_run_value

TOP_LEVEL_KEYS = ("run", "model", "datasets", "preprocess", "plugins")
STANDARD_DATASET_KEYS = (
    "data_type", "build_info", "vis_processor", "text_processor", "kw_processor", "type", "sample_ratio",
    "dataset_card",
)
PROCESSOR_SPLITS = ("train", "eval")


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
        project = Layer(self.cfg_path, load_yaml(self.cfg_path, "project config"))
        user_options = Layer("--options", parse_options(options))
        self._check_top_level([project, user_options])
        for layer in (project, user_options):  # "coco_caption:" with nothing under it means "the defaults"
            datasets = get_node(layer.cfg, "datasets")
            for name in node_keys(datasets):
                if get_node(datasets, name) is None:
                    datasets[name] = {}

        self.plugins = plugin_names(get_node(project.cfg, "plugins"), project.source)
        self.plugins += plugin_names(get_node(user_options.cfg, "plugins"), "--options")
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

    def _check_top_level(self, layers: list[Layer]) -> None:
        errors = [
            unknown_key_message(key, key, TOP_LEVEL_KEYS, layer.source)
            for layer in layers
            for key in node_keys(layer.cfg)
            if key not in TOP_LEVEL_KEYS
        ]
        if errors:
            raise ConfigError(self._format_errors(errors))

    def _model_layers(self, user: DictConfig, errors: list[str]) -> tuple[list[Layer], set[str] | None]:
        """The model zoo layer (model:, preprocess:) and the valid model keys."""
        model = get_node(user, "model")
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
            cfg = load_yaml(path, f"model zoo config of {arch}/{zoo_type}")
            if not hasattr(model_cls, "config_keys"):  # a plugin without BaseModel: its zoo YAMLs name keys too
                valid |= set(node_keys(get_node(cfg, "model")))
            if zoo_type == self.model_type:
                layers.append(Layer(path, cfg))
        return layers, valid

    def _dataset_layers(self, user: DictConfig, errors: list[str]) -> tuple[list[Layer], dict[str, set[str]]]:
        """One default-YAML layer per dataset builder, and the valid keys per dataset."""
        datasets = get_node(user, "datasets")
        if datasets is None:
            return [], {}
        if not isinstance(datasets, DictConfig):
            errors.append(f"'datasets' must map builder names to their options, got {datasets!r}")
            return [], {}
        layers, valid_keys = [], {}
        for name in node_keys(datasets):
            try:
                builder_cls = registry.builders.get(name)
            except RegistryError as err:
                errors.append(f"datasets.{name}: {err}")
                continue
            node = get_node(datasets, name)
            ds_type = (node.get("type") if isinstance(node, DictConfig) else None) or "default"
            valid = set(STANDARD_DATASET_KEYS) | set(getattr(builder_cls, "EXTRA_CONFIG_KEYS", ()))
            types = dict(getattr(builder_cls, "DATASET_CONFIG_DICT", {}) or {})
            if types and ds_type not in types:
                errors.append(f"datasets.{name}.type '{ds_type}' is unknown; types: {', '.join(types)}")
                continue
            for type_name in types:
                path = os.fspath(builder_cls.default_config_path(type_name))
                cfg = load_yaml(path, f"default config of dataset {name} ({type_name})")
                entries = get_node(cfg, "datasets")
                if not isinstance(entries, DictConfig) or not entries:
                    errors.append(f"dataset default config '{path}' must hold 'datasets: {{{name}: ...}}'")
                    continue
                key = name if name in entries else (node_keys(entries)[0] if len(entries) == 1 else None)
                if key is None:
                    errors.append(f"dataset default config '{path}' has no entry '{name}' under 'datasets'")
                    continue
                valid |= set(node_keys(get_node(entries, key)))
                if type_name == ds_type:
                    layers.append(Layer(path, OmegaConf.create({"datasets": {name: entries[key]}})))
            valid_keys[name] = valid
        return layers, valid_keys

    # -- validation ----------------------------------------------------------------------------
    def _source_of(self, *keys: str) -> str:
        """The last layer that sets cfg[keys...]: the file (or --options) to blame."""
        for layer in reversed(self.layers):
            if has_key(layer.cfg, keys):
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
        run = get_node(self.config, "run")
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
        for key in node_keys(run):
            source = self._source_of("run", key)
            if key not in schema:
                if key in NOT_READ_RUN_KEYS:
                    errors.append(f"run.{key} (from {source}) is not read by anything here: {NOT_READ_RUN_KEYS[key]}; "
                                  f"remove it")
                else:
                    errors.append(unknown_key_message(f"run.{key}", key, schema, source))
                continue
            value = get_node(run, key)
            errors.extend(check_run_value(key, value, schema[key], source))

    def _validate_section(self, dotted: str, valid: set[str] | None, errors: list[str]) -> None:
        keys = dotted.split(".")
        node = get_node(self.config, *keys)
        if valid is None or not isinstance(node, DictConfig):
            return
        for key in node_keys(node):
            if key not in valid:
                errors.append(unknown_key_message(f"{dotted}.{key}", key, valid, self._source_of(*keys, key)))

    def _validate_qformer(self, errors: list[str]) -> None:
        """``model.qformer`` names a registered Q-Former; ``model.qformer_config`` holds only its config's keys."""
        model = get_node(self.config, "model")
        if not isinstance(model, DictConfig) or not ({"qformer", "qformer_config"} & set(node_keys(model))):
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
        model = get_node(self.config, "model")
        if self.model_cls is None or not isinstance(model, DictConfig):
            return
        for key, allowed in dict(getattr(self.model_cls, "CONFIG_CHOICES", {}) or {}).items():
            value = get_node(model, key)
            if value is not None and value not in allowed:
                errors.append(f"model.{key} (from {self._source_of('model', key)}) must be one of "
                              f"{', '.join(map(str, allowed))}, got {value!r}")

    def _validate_null_splits(self, errors: list[str]) -> None:
        """``build_info.annotations.<split>: null`` switches a default split off; using that split is an error."""
        run = get_node(self.config, "run")
        used = {}
        for key in ("train_splits", "valid_splits", "test_splits"):
            value = get_node(run, key) if isinstance(run, DictConfig) else None
            for split in ([value] if isinstance(value, str) else list(value or [])):
                used.setdefault(str(split), key)
        for name in node_keys(get_node(self.config, "datasets")):
            annotations = get_node(self.config, "datasets", name, "build_info", "annotations")
            for split in node_keys(annotations):
                if get_node(annotations, split) is None and split in used:
                    errors.append(f"datasets.{name}.build_info.annotations.{split} (from "
                                  f"{self._source_of('datasets', name, 'build_info', 'annotations', split)}) is null, "
                                  f"which switches that split off, but run.{used[split]} uses it")

    def _validate_processors(self, errors: list[str]) -> None:
        """Processor nodes (datasets.*.{vis,text}_processor.{train,eval}, preprocess.*) name real processors."""
        from processors import check_processor_keys  # imported here: torchvision is not needed before

        places = [("preprocess",)] + [("datasets", name) for name in node_keys(get_node(self.config, "datasets"))]
        for base in places:
            for proc_kind in ("vis_processor", "text_processor"):
                node = get_node(self.config, *base, proc_kind)
                if not isinstance(node, DictConfig):
                    continue
                for split in node_keys(node):
                    path = (*base, proc_kind, split)
                    dotted = ".".join(path)
                    source = self._source_of(*path)
                    if split not in PROCESSOR_SPLITS:
                        errors.append(unknown_key_message(dotted, split, PROCESSOR_SPLITS, source))
                        continue
                    proc = get_node(self.config, *path)
                    if not isinstance(proc, DictConfig) or not proc.get("name"):
                        errors.append(f"{dotted} (from {source}) needs a 'name' (a registered processor)")
                        continue
                    try:
                        proc_cls = registry.processors.get(proc.name)
                    except RegistryError as err:
                        errors.append(f"{dotted}.name (from {source}): {err}")
                        continue
                    errors.extend(check_processor_keys(proc_cls, set(node_keys(proc)), where=f"{dotted} (from {source})"))

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
        return f"Config({self.cfg_path!r}, arch={self.model.get('arch')!r}, datasets={node_keys(self.datasets)})"


def _replace_encoder_kwargs(merged: DictConfig, user: DictConfig, model_layers: Sequence[Layer]) -> None:
    """``model.vit_kwargs`` naming another timm ``model_name`` than the model defaults replaces them instead of
    merging key by key: one model's constructor arguments (``embed_dim``, ``depth``) mean nothing to another."""
    user_kwargs = get_node(user, "model", "vit_kwargs")
    if user_kwargs is None or "model_name" not in user_kwargs:
        return
    default_names = [get_node(layer.cfg, "model", "vit_kwargs", "model_name") for layer in model_layers]
    default_names = [name for name in default_names if name is not None]
    if default_names and default_names[-1] != user_kwargs.model_name:
        merged.model.vit_kwargs = user_kwargs


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--cfg``, ``--options`` and ``--plugins`` (shared by runners.train and runners.evaluate)."""
    parser.add_argument("--cfg", "--cfg-path", dest="cfg", required=True, metavar="YAML",
                        help="project YAML, e.g. projects/blip2/stage2.yaml")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. run.batch_size_train=8 model.prompt='a photo of'")
    parser.add_argument("--plugins", nargs="+", default=[], metavar="MODULE",
                        help="import these modules before building anything (they register components)")
    return parser
