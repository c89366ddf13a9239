"""Decoding settings are defined once per model family (its ``generate()`` / ``predict_answers()`` signature and,
for ``model.prompt``, its zoo YAML); a project YAML sets one only to differ from that default, and a paper recipe
says where its value comes from (the released LAVIS config or the paper) in a comment on the same line.

The check reads each project YAML as written (not merged), so a key that restates the default fails here even
though it changes nothing: such a copy would silently drift when the family default is corrected.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

import registry
from runners.config import Config

ROOT = Path(__file__).resolve().parents[1]
PROJECTS = sorted(p for p in (ROOT / "projects").rglob("*.yaml") if "configs" not in p.parent.parts)
PAPER_PROJECTS = [p for p in PROJECTS if not {"demo", "examples"} & set(p.relative_to(ROOT / "projects").parts)]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def decoding_arguments(task_cls: type) -> tuple[str, dict[str, str]] | None:
    """(model method, {run key: argument}) the task hands its decoding ``run:`` keys to, or None."""
    if getattr(task_cls, "DECODING_KEYS", None):
        return "generate", dict(task_cls.DECODING_KEYS)
    if getattr(task_cls, "INFERENCE_KEYS", None):
        return "predict_answers", {key: key for key in task_cls.INFERENCE_KEYS}
    return None


def family_default(model_cls: type, method: str, argument: str) -> Any:
    """The default of ``argument`` in the family's ``method`` (a None length penalty means the class's own)."""
    param = inspect.signature(getattr(model_cls, method)).parameters.get(argument)
    if param is None or param.default is inspect.Parameter.empty:
        return inspect.Parameter.empty
    if param.default is None and argument == "length_penalty" and hasattr(model_cls, "ANSWER_LENGTH_PENALTY"):
        return model_cls.ANSWER_LENGTH_PENALTY
    return param.default


def zoo_prompt(model_cls: type, model_type: str | None) -> Any:
    """``model.prompt`` as the zoo YAML of (arch, model_type) sets it, else the constructor default."""
    if model_type in (getattr(model_cls, "PRETRAINED_MODEL_CONFIG_DICT", None) or {}):
        zoo = OmegaConf.load(model_cls.default_config_path(model_type))
        if "prompt" in zoo.get("model", {}):
            return zoo.model.prompt
    param = inspect.signature(model_cls.__init__).parameters.get("prompt")
    return inspect.Parameter.empty if param is None else param.default


def restated_defaults(path: Path) -> list[str]:
    """Every decoding key of the project YAML at ``path`` whose value equals what its model family does anyway."""
    raw = yaml.safe_load(path.read_text()) or {}
    run, model = raw.get("run") or {}, raw.get("model") or {}
    cfg = Config(path)
    model_cls = registry.models.get(cfg.model.arch)
    found = []
    if "prompt" in model and model["prompt"] == zoo_prompt(model_cls, cfg.model.get("model_type")):
        found.append(f"model.prompt: {model['prompt']!r} (the zoo default of {cfg.model.arch}/{cfg.model.model_type})")
    mapping = decoding_arguments(registry.tasks.get(cfg.run.task)) if cfg.run.get("task") else None
    if mapping is None:
        return found
    method, arguments = mapping
    model_prompt = cfg.model.get("prompt") or ""
    for key, value in run.items():
        if key == "prompt":  # no run prompt = the model's own (a VQA prompt only when it holds '{}')
            default = model_prompt if method == "generate" or "{}" in model_prompt else ""
        elif key in arguments:
            default = family_default(model_cls, method, arguments[key])
        else:
            continue
        if value == default and isinstance(value, bool) == isinstance(default, bool):  # True == 1 is no restatement
            found.append(f"run.{key}: {value!r} (the default of {model_cls.__name__}.{method})")
    return found


@pytest.mark.parametrize("path", PROJECTS, ids=_rel)
def test_project_decoding_keys_differ_from_the_family_default(path):
    assert restated_defaults(path) == [], f"{_rel(path)} restates its model family's decoding defaults"


def _decoding_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of each decoding key the ``run:`` section of a YAML sets."""
    keys = {"num_beams", "max_len", "min_len", "length_penalty", "repetition_penalty", "top_p", "temperature",
            "use_nucleus_sampling", "prompt", "inference_method", "num_ans_candidates"}
    lines, in_run = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line and not line[0].isspace():
            in_run = line.startswith("run:")
        elif in_run and line.strip().split(":")[0] in keys:
            lines.append((number, line))
    return lines


@pytest.mark.parametrize("path", PAPER_PROJECTS, ids=_rel)
def test_paper_recipe_decoding_overrides_name_their_source(path):
    bare = [f"{_rel(path)}:{n}: {line.strip()}" for n, line in _decoding_lines(path) if "#" not in line]
    assert bare == [], "a decoding override of a paper recipe needs its source (LAVIS config or paper) in a comment"


def test_restated_default_is_caught(tmp_path):
    """The check fails on a copy of the family default (5 beams, 30 tokens) and passes a real override."""
    text = ("model: {arch: blip2_opt, model_type: caption_coco_opt2.7b, prompt: 'a photo of'}\n"
            "run: {task: captioning, evaluate: true, test_splits: [test], num_beams: 5, max_len: 30, min_len: 8,\n"
            "      prompt: 'a photo of', length_penalty: 1.0}\n")
    (tmp_path / "p.yaml").write_text(text)
    found = restated_defaults(tmp_path / "p.yaml")
    assert [f.split(":")[0] for f in found] == ["model.prompt", "run.num_beams", "run.max_len", "run.prompt",
                                                 "run.length_penalty"]
    vqa = ("model: {arch: blip2_t5, model_type: pretrain_flant5xl}\n"
           "run: {task: vqa, evaluate: true, test_splits: [val], num_beams: 3, length_penalty: -1,\n"
           "      prompt: 'Question: {} Short answer:'}\n")
    (tmp_path / "v.yaml").write_text(vqa)
    assert [f.split(":")[0] for f in restated_defaults(tmp_path / "v.yaml")] == ["run.length_penalty"]
