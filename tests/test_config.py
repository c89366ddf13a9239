"""Config: four-layer merge precedence, unknown-key errors with file and close matches, plugins, cache root."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from omegaconf import OmegaConf

import registry
from common.paths import cache_root, resolve_storage_path
from runners.config import Config, ConfigError, add_config_arguments
from runners.run_schema import RUN_SCHEMA, RunKey

# ---------------------------------------------------------------------------------------------------
# fakes: a model with two zoo types, a builder with two dataset types, a task with extra run keys
# ---------------------------------------------------------------------------------------------------
ZOO_SMALL = {
    "model": {"arch": "small_tag", "image_size": 224, "num_query_token": 32, "prompt": "", "freeze_vit": True},
    "preprocess": {
        "vis_processor": {"train": {"name": "blip_image_train", "image_size": 224},
                          "eval": {"name": "blip_image_eval", "image_size": 224}},
        "text_processor": {"train": {"name": "blip_caption"}, "eval": {"name": "blip_caption"}},
    },
    "datasets": {"fake_ds": {"sample_ratio": "zoo"}},  # only to prove the zoo is the lowest layer
}
ZOO_LARGE = {"model": {"arch": "large_tag", "image_size": 364, "only_in_large_zoo": 1}}
DS_DEFAULT = {
    "datasets": {
        "fake_ds": {
            "data_type": "images",
            "sample_ratio": "builder",
            "build_info": {
                "annotations": {"train": {"url": "http://example.invalid/train.json", "storage": "fake/train.json"}},
                "images": {"storage": "${oc.env:BLIP2_CACHE_ROOT,'~/.cache/blip2'}/fake/images"},
            },
            "vis_processor": {"train": {"name": "blip2_image_train", "image_size": 224}},
            "caption_field": "caption",
        }
    }
}
DS_EVAL = {"datasets": {"fake_ds": {"data_type": "images", "eval_only_key": True}}}
BUILT = []  # every from_config/__init__ call of a fake model or builder lands here


class FakeModel:
    PRETRAINED_MODEL_CONFIG_DICT = {"small": "zoo_small.yaml", "large": "zoo_large.yaml"}
    EXTRA_CONFIG_KEYS = ("extra_knob",)
    root: Path

    def __init__(self, *args, **kwargs):
        BUILT.append(("model", args, kwargs))

    @classmethod
    def default_config_path(cls, model_type: str) -> Path:
        return cls.root / cls.PRETRAINED_MODEL_CONFIG_DICT[model_type]

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg)


class FakeBuilder:
    DATASET_CONFIG_DICT = {"default": "ds_default.yaml", "eval": "ds_eval.yaml"}
    root: Path

    def __init__(self, *args, **kwargs):
        BUILT.append(("builder", args, kwargs))

    @classmethod
    def default_config_path(cls, type: str = "default") -> Path:
        return cls.root / cls.DATASET_CONFIG_DICT[type]


class FakeTask:
    RUN_KEYS = {"fake_task_knob": RunKey("an option only this task understands", (int,)), "fake_doc_only": "doc"}


class FakeRunner:
    RUN_KEYS = {"fake_runner_knob": "an option only this runner understands"}


@pytest.fixture
def fakes(tmp_path: Path):
    zoo, data = tmp_path / "zoo", tmp_path / "data"
    zoo.mkdir()
    data.mkdir()
    for path, content in [(zoo / "zoo_small.yaml", ZOO_SMALL), (zoo / "zoo_large.yaml", ZOO_LARGE),
                          (data / "ds_default.yaml", DS_DEFAULT), (data / "ds_eval.yaml", DS_EVAL)]:
        path.write_text(yaml.safe_dump(content))
    model_cls = type("FakeModelT", (FakeModel,), {"root": zoo})
    builder_cls = type("FakeBuilderT", (FakeBuilder,), {"root": data})
    entries = [(registry.models, "fake_arch", model_cls), (registry.builders, "fake_ds", builder_cls),
               (registry.tasks, "fake_task", FakeTask), (registry.runners, "fake_runner", FakeRunner),
               (registry.lr_schedulers, "fake_sched", object)]
    for reg, name, obj in entries:
        reg.add(name, obj)
    BUILT.clear()
    yield SimpleNamespace(zoo=zoo, data=data, model=model_cls, builder=builder_cls, root=tmp_path)
    for reg, name, _ in entries:
        reg.unregister(name)


def base_project() -> dict:
    return {
        "model": {"arch": "fake_arch", "model_type": "small"},
        "datasets": {"fake_ds": {"vis_processor": {"train": {"name": "blip2_image_train", "image_size": 364}}}},
        "run": {"task": "fake_task", "runner": "fake_runner", "lr_sched": "fake_sched", "batch_size_train": 4,
                "init_lr": 1e-4, "amp": "bf16"},
    }


def write_project(root: Path, content: dict, name: str = "project.yaml") -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(content))
    return path


def errors_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        Config(*args, **kwargs)
    return str(err.value)


# ---------------------------------------------------------------------------------------------------
# merge precedence
# ---------------------------------------------------------------------------------------------------
def test_layers_merge_and_keys_from_each_layer_survive(fakes):
    cfg = Config(write_project(fakes.root, base_project()))
    assert cfg.model.num_query_token == 32 and cfg.model.freeze_vit is True  # zoo only
    assert cfg.model.arch == "fake_arch"  # the project's registry name beats the zoo's tag
    assert cfg.model.model_type == "small"
    assert cfg.preprocess.vis_processor.eval.name == "blip_image_eval"  # zoo preprocess node kept
    assert cfg.datasets.fake_ds.data_type == "images" and cfg.datasets.fake_ds.caption_field == "caption"  # builder
    assert cfg.datasets.fake_ds.vis_processor.train.image_size == 364  # project beats builder
    assert cfg.run.batch_size_train == 4
    assert [Path(layer.source).name for layer in cfg.layers] == [
        "zoo_small.yaml", "ds_default.yaml", "project.yaml", "--options"
    ]
    assert BUILT == []  # pure config work: nothing was built


@pytest.mark.parametrize(
    "layers, expected",
    [
        (("zoo",), "zoo"),
        (("zoo", "builder"), "builder"),
        (("zoo", "builder", "project"), "project"),
        (("zoo", "builder", "project", "options"), "options"),
        (("zoo", "project", "options"), "options"),
        (("builder", "options"), "options"),
    ],
)
def test_four_layer_precedence(fakes, layers, expected):
    """datasets.fake_ds.sample_ratio is set by every layer that is switched on; the latest must win."""
    if "zoo" not in layers:
        fakes.model.root.joinpath("zoo_small.yaml").write_text(yaml.safe_dump({**ZOO_SMALL, "datasets": {}}))
    if "builder" not in layers:
        DS_NO_RATIO = {"datasets": {"fake_ds": {k: v for k, v in DS_DEFAULT["datasets"]["fake_ds"].items()
                                                if k != "sample_ratio"}}}
        fakes.builder.root.joinpath("ds_default.yaml").write_text(yaml.safe_dump(DS_NO_RATIO))
    project = base_project()
    if "project" in layers:
        project["datasets"]["fake_ds"]["sample_ratio"] = "project"
    options = ["datasets.fake_ds.sample_ratio=options"] if "options" in layers else []
    cfg = Config(write_project(fakes.root, project), options=options)
    assert cfg.datasets.fake_ds.sample_ratio == expected


def test_options_override_model_and_run_and_select_model_type(fakes):
    path = write_project(fakes.root, base_project())
    cfg = Config(path, options=["model.image_size=490", "run.batch_size_train=8", "model.prompt=a photo of"])
    assert cfg.model.image_size == 490 and cfg.run.batch_size_train == 8 and cfg.model.prompt == "a photo of"
    large = Config(path, options=["model.model_type=large"])  # the option picks the zoo file
    assert large.model.image_size == 364 and large.model.only_in_large_zoo == 1
    assert "num_query_token" not in large.model  # only the selected zoo file is merged
    assert Path(large.layers[0].source).name == "zoo_large.yaml"


def test_empty_dataset_node_means_builder_defaults(fakes):
    project = base_project()
    project["datasets"]["fake_ds"] = None  # "fake_ds:" with nothing under it
    cfg = Config(write_project(fakes.root, project))
    assert cfg.datasets.fake_ds.caption_field == "caption" and cfg.datasets.fake_ds.data_type == "images"


def test_dataset_type_selects_builder_yaml(fakes):
    project = base_project()
    project["datasets"]["fake_ds"]["type"] = "eval"
    cfg = Config(write_project(fakes.root, project))
    assert cfg.datasets.fake_ds.eval_only_key is True and "caption_field" not in cfg.datasets.fake_ds


# ---------------------------------------------------------------------------------------------------
# unknown keys and bad values
# ---------------------------------------------------------------------------------------------------
def test_unknown_run_key_names_key_file_and_close_match(fakes):
    project = base_project()
    project["run"]["bach_size_train"] = 8
    path = write_project(fakes.root, project)
    message = errors_of(path)
    assert "unknown key 'run.bach_size_train'" in message and f"(from {path})" in message
    assert "Did you mean: batch_size_train" in message and "Valid keys:" in message
    message = errors_of(write_project(fakes.root, base_project()), options=["run.warmup_stepz=10"])
    assert "run.warmup_stepz" in message and "(from --options)" in message and "warmup_steps" in message


def test_unknown_model_key_names_zoo_union_and_file(fakes):
    project = base_project()
    project["model"]["num_query_tokens"] = 16
    path = write_project(fakes.root, project)
    message = errors_of(path)
    assert "unknown key 'model.num_query_tokens'" in message and str(path) in message
    assert "Did you mean: num_query_token" in message
    # keys of any zoo file of this arch are valid, and so are the class's EXTRA_CONFIG_KEYS
    ok = base_project()
    ok["model"].update(only_in_large_zoo=2, extra_knob=True, load_finetuned=False)
    assert Config(write_project(fakes.root, ok)).model.only_in_large_zoo == 2


def test_unknown_dataset_key_names_key_and_file(fakes):
    project = base_project()
    project["datasets"]["fake_ds"]["data_typ"] = "images"
    path = write_project(fakes.root, project)
    message = errors_of(path)
    assert "unknown key 'datasets.fake_ds.data_typ'" in message and str(path) in message
    assert "Did you mean: data_type" in message
    ok = base_project()
    ok["datasets"]["fake_ds"].update(eval_only_key=False, sample_ratio=2, build_info={"images": {"storage": "/x"}})
    assert Config(write_project(fakes.root, ok)).datasets.fake_ds.build_info.images.storage == "/x"


def test_all_problems_reported_at_once(fakes):
    project = base_project()
    project["run"]["max_epochz"] = 1
    project["model"]["promt"] = "x"
    project["datasets"]["fake_ds"]["vis_processor"]["train"]["image_sise"] = 3
    message = errors_of(write_project(fakes.root, project))
    assert "3 problem(s)" in message
    assert "run.max_epochz" in message and "model.promt" in message and "image_sise" in message


def test_task_and_runner_declare_extra_run_keys(fakes):
    project = base_project()
    project["run"].update(fake_task_knob=3, fake_runner_knob="x", fake_doc_only=1)
    assert Config(write_project(fakes.root, project)).run.fake_task_knob == 3
    project["run"]["fake_task_knob"] = "three"
    assert "run.fake_task_knob" in errors_of(write_project(fakes.root, project))
    project = base_project()
    project["run"].update(task="other_task", fake_task_knob=3)
    registry.tasks.add("other_task", object)
    try:
        assert "unknown key 'run.fake_task_knob'" in errors_of(write_project(fakes.root, project))
    finally:
        registry.tasks.unregister("other_task")


@pytest.mark.parametrize(
    "key, value, ok",
    [
        ("amp", "bf16", True), ("amp", "FP16", True), ("amp", "off", True), ("amp", True, True), ("amp", "false", True),
        ("amp", "bf32", False), ("batch_size_train", "eight", False), ("batch_size_train", True, False),
        ("init_lr", 3, True), ("init_lr", "fast", False), ("init_lr", 0, False), ("init_lr", -1e-4, False),
        ("batch_size_train", -1, False), ("batch_size_train", 0, False), ("batch_size_train", None, False),
        ("beta2", 1.5, False), ("num_workers", -2, False), ("num_workers", 0, True), ("warmup_lr", -1, True),
        ("stop_signals", ["SIGTERM"], True), ("stop_signals", ["SIGKILL"], False),
        ("train_splits", ["train"], True), ("grad_clip", None, True), ("grad_clip", -1.0, False),
        ("lr_scales", {"Qformer": 0.1}, True), ("lr_scales", None, True), ("lr_scales", 0.1, False),
    ],
)
def test_run_value_checks(fakes, key, value, ok):
    project = base_project()
    project["run"][key] = value
    path = write_project(fakes.root, project)
    if ok:
        assert Config(path).run[key] == value
    else:
        message = errors_of(path)
        assert f"run.{key}" in message and ("is null" if value is None else repr(value)) in message


@pytest.mark.parametrize("key, value, ok", [("inference_method", "rank", True), ("inference_method", "guess", False),
                                            ("num_beams", 0, False), ("num_beams", 3, True)])
def test_task_keys_are_checked_for_the_task_that_reads_them(fakes, key, value, ok):
    project = base_project()
    project["run"][key] = value
    assert f"unknown key 'run.{key}'" in errors_of(write_project(fakes.root, project))  # fake_task does not read it
    project["run"]["task"] = "vqa"
    path = write_project(fakes.root, project)
    if ok:
        assert Config(path).run[key] == value
    else:
        message = errors_of(path)
        assert f"run.{key}" in message and repr(value) in message


def test_lavis_keys_nothing_reads_are_refused_with_the_reason(fakes):
    project = base_project()
    project["run"].update(itm_negatives="hardest", dist_url="env://")
    message = errors_of(write_project(fakes.root, project))
    assert "run.itm_negatives" in message and "model.itm_negatives (multinomial | hardest)" in message
    assert "run.dist_url" in message and "not read by anything" in message


def test_unknown_names_give_close_matches(fakes):
    project = base_project()
    project["model"]["arch"] = "fake_arc"
    message = errors_of(write_project(fakes.root, project))
    assert "model.arch" in message and "Did you mean: fake_arch" in message
    project = base_project()
    project["model"]["model_type"] = "smal"
    message = errors_of(write_project(fakes.root, project))
    assert "'smal' is unknown" in message and "small, large" in message
    project = base_project()
    project["datasets"] = {"fake_dz": {}}
    assert "Did you mean: fake_ds" in errors_of(write_project(fakes.root, project))
    project = base_project()
    project["datasets"]["fake_ds"]["type"] = "evall"
    assert "type 'evall' is unknown; types: default, eval" in errors_of(write_project(fakes.root, project))
    project = base_project()
    project["run"]["task"] = "fake_tsk"
    assert "run.task" in errors_of(write_project(fakes.root, project))
    project = base_project()
    project["datasets"]["fake_ds"]["text_processor"] = {"train": {"name": "blip_captoin"}}
    assert "Did you mean: blip_caption" in errors_of(write_project(fakes.root, project))
    project = base_project()
    project["datasets"]["fake_ds"]["text_processor"] = {"trian": {"name": "blip_caption"}}
    assert "text_processor.trian" in errors_of(write_project(fakes.root, project))


def test_bad_files_and_options(fakes):
    missing = fakes.root / "nope.yaml"
    assert f"'{missing}' does not exist" in errors_of(missing)
    bad_yaml = fakes.root / "bad.yaml"
    bad_yaml.write_text("run: [unclosed\n")
    assert "not valid YAML" in errors_of(bad_yaml)
    path = write_project(fakes.root, base_project(), name="good.yaml")
    assert "key=value" in errors_of(path, options=["run.batch_size_train", "8"])
    project = base_project()
    project["modle"] = {}
    assert "unknown key 'modle'" in errors_of(write_project(fakes.root, project))
    project = base_project()
    del project["model"]["arch"]
    assert "model.arch is missing" in errors_of(write_project(fakes.root, project))
    fakes.model.root.joinpath("zoo_large.yaml").unlink()
    assert "zoo_large.yaml' does not exist" in errors_of(path)


# ---------------------------------------------------------------------------------------------------
# plugins through Config and the CLI arguments
# ---------------------------------------------------------------------------------------------------
PLUGIN = '''
import registry
from pathlib import Path

@registry.models.register({arch!r})
class PluginModel:
    PRETRAINED_MODEL_CONFIG_DICT = {{"base": "plugin_zoo.yaml"}}

    @classmethod
    def default_config_path(cls, model_type):
        return Path(__file__).parent / cls.PRETRAINED_MODEL_CONFIG_DICT[model_type]
'''


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch):
    created = []

    def make(module: str, arch: str) -> str:
        (tmp_path / f"{module}.py").write_text(PLUGIN.format(arch=arch))
        (tmp_path / "plugin_zoo.yaml").write_text(yaml.safe_dump({"model": {"plugin_width": 8}}))
        created.append((module, arch))
        return module

    monkeypatch.syspath_prepend(str(tmp_path))
    yield make
    for module, arch in created:
        sys.modules.pop(module, None)
        if arch in registry.models._entries:
            registry.models.unregister(arch)


def test_plugin_from_yaml_is_loaded_before_lookup(fakes, plugin_dir):
    project = {"plugins": [plugin_dir("cfg_yaml_plugin", "plugin_arch_yaml")],
               "model": {"arch": "plugin_arch_yaml", "plugin_width": 16}}
    cfg = Config(write_project(fakes.root, project))
    assert cfg.model.plugin_width == 16 and cfg.model.model_type == "base"  # the only zoo type is the default
    assert list(cfg.config.plugins) == ["cfg_yaml_plugin"]


def test_plugin_from_cli_and_options(fakes, plugin_dir):
    path = write_project(fakes.root, {"model": {"arch": "plugin_arch_cli"}})
    assert "plugin_arch_cli" in errors_of(path)  # without the plugin the arch is unknown
    module = plugin_dir("cfg_cli_plugin", "plugin_arch_cli")
    parser = add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--cfg", str(path), "--plugins", module, "--options", "model.plugin_width=4"])
    cfg = Config.from_args(args)
    assert cfg.model.plugin_width == 4 and list(cfg.config.plugins) == [module]
    other = plugin_dir("cfg_opt_plugin", "plugin_arch_opt")
    cfg = Config(write_project(fakes.root, {"model": {"arch": "plugin_arch_opt"}}), options=[f"plugins=[{other}]"])
    assert cfg.model.plugin_width == 8
    assert "'missing_plugin_q' could not be imported" in errors_of(path, plugins=["missing_plugin_q"])


# ---------------------------------------------------------------------------------------------------
# cache root, printing, saving
# ---------------------------------------------------------------------------------------------------
def test_cache_root_from_environment(fakes, monkeypatch, tmp_path):
    monkeypatch.setenv("BLIP2_CACHE_ROOT", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    assert resolve_storage_path("coco/images") == tmp_path / "cache" / "coco" / "images"
    assert resolve_storage_path("/abs/path") == Path("/abs/path")
    cfg = Config(write_project(fakes.root, base_project()))
    assert cfg.to_dict()["datasets"]["fake_ds"]["build_info"]["images"]["storage"] == f"{tmp_path}/cache/fake/images"
    assert OmegaConf.create({"p": "${cache_root:coco/images}"}).p == f"{tmp_path}/cache/coco/images"
    monkeypatch.setenv("BLIP2_CACHE_ROOT", "~/elsewhere")
    assert cache_root() == Path.home() / "elsewhere"
    monkeypatch.delenv("BLIP2_CACHE_ROOT")
    assert cache_root() == Path.home() / ".cache" / "blip2"
    assert resolve_storage_path("~/x") == Path.home() / "x"


def test_str_save_and_round_trip(fakes, tmp_path):
    cfg = Config(write_project(fakes.root, base_project()), options=["run.seed=7"])
    text = str(cfg)
    for section in ("===== run =====", "===== model =====", "===== datasets =====", "===== preprocess ====="):
        assert section in text
    assert "seed: 7" in text and "zoo_small.yaml" in text and "--options" in text
    saved = cfg.save(tmp_path / "out" / "config.yaml")
    assert yaml.safe_load(saved.read_text()) == cfg.to_dict()
    again = Config(saved)  # a saved config is itself a valid project YAML
    assert again.to_dict() == cfg.to_dict()
    assert cfg.run_cfg is not None and cfg.model_cfg.arch == "fake_arch"  # LAVIS spellings
    assert "fake_arch" in repr(cfg)


def test_run_schema_covers_the_lavis_run_keys():
    lavis_keys = """task runner lr_sched init_lr min_lr warmup_lr warmup_steps lr_decay_rate weight_decay lr_layer_decay
        beta2 max_epoch max_iters iters_per_inner_epoch batch_size_train batch_size_eval num_workers accum_grad_iters amp
        seed output_dir resume_ckpt_path evaluate train_splits valid_splits test_splits device world_size dist_url
        distributed use_dist_eval_sampler log_freq save_freq val_freq save_last train_dataset_ratios k_test num_beams
        max_len min_len length_penalty inference_method prompt num_ans_candidates answer_list apply_lemmatizer""".split()
    # every LAVIS key is either read here (run schema or a task's RUN_KEYS) or refused with the reason
    from runners.run_schema import NOT_READ_RUN_KEYS, TASK_KEY_CHECKS

    assert set(lavis_keys) <= set(RUN_SCHEMA) | set(TASK_KEY_CHECKS) | set(NOT_READ_RUN_KEYS)
    assert not set(RUN_SCHEMA) & set(NOT_READ_RUN_KEYS)
    assert all(isinstance(spec, RunKey) and spec.help for spec in RUN_SCHEMA.values())


def test_every_registered_model_type_and_dataset_type_validates(tmp_path):
    """The real zoo and builder YAMLs (and the processors they name) pass validation on their own."""
    problems, checked = [], 0
    cases = [
        {"model": {"arch": arch, "model_type": model_type}}
        for arch in registry.models.list()
        for model_type in getattr(registry.models.get(arch), "PRETRAINED_MODEL_CONFIG_DICT", {}) or {}
    ] + [
        {"datasets": {name: {"type": ds_type}}}
        for name in registry.builders.list()
        for ds_type in getattr(registry.builders.get(name), "DATASET_CONFIG_DICT", {}) or {}
    ]
    for case in cases:
        try:
            Config(write_project(tmp_path, case))
            checked += 1
        except ConfigError as err:
            problems.append(f"{case}: {err}")
    assert not problems, "\n".join(problems)
    assert checked >= 10  # the zoo (issue 3) and the builders (issue 4) are registered


def test_encoder_kwargs_of_another_timm_model_replace_the_defaults(tmp_path):
    """Real zoo YAML (blip2/tiny: a ViT): a project naming a CNN gets only its own vit_kwargs; the same model
    name merges key by key."""
    cnn = {"model_name": "convnext_atto", "depths": [1, 1, 0, 0]}
    cfg = Config(write_project(tmp_path, {"model": {"arch": "blip2", "model_type": "tiny", "vit_kwargs": cnn}}))
    assert OmegaConf.to_container(cfg.model.vit_kwargs) == cnn
    same = {"model_name": "vit_tiny_patch16_224", "depth": 1}
    cfg = Config(write_project(tmp_path, {"model": {"arch": "blip2", "model_type": "tiny", "vit_kwargs": same}}))
    assert cfg.model.vit_kwargs.depth == 1 and cfg.model.vit_kwargs.embed_dim == 48  # default kept
    cfg = Config(write_project(tmp_path, {"model": {"arch": "blip2", "model_type": "tiny"}}),
                 options=["model.vit_kwargs={model_name: convnext_atto}"])
    assert OmegaConf.to_container(cfg.model.vit_kwargs) == {"model_name": "convnext_atto"}
