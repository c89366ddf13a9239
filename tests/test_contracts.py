"""Every registered component honours its contract (ARCHITECTURE.md, "Contracts between the parts").

Parametrised over ``registry.<name>.list()`` in the style of timm's tests over ``list_models()``: a newly registered
image encoder, LLM adapter, Q-Former, builder, task or model is checked without writing a test for it. Components
are built tiny (random weights, local tiny LLMs), so each case runs in seconds on a CPU.
"""
from __future__ import annotations

import inspect
import os

import pytest
import torch
from omegaconf import OmegaConf

import registry
from models.base_model import init_parameters, model_config_keys
from runners.config import STANDARD_DATASET_KEYS
from tasks.base_task import BaseTask

# How to build each registered image encoder small. A name missing here fails ``test_image_encoder_contract``:
# add a tiny recipe when you register an encoder.
TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0)
TINY_ENCODERS = {  # name -> (image size, keyword arguments)
    "eva_vit_g": (28, TINY_VIT), "clip_vit_l": (28, TINY_VIT),
    "timm": (32, dict(model_name="vit_tiny_patch16_224", depth=2)),
}
TINY_LLMS = {"opt": "tiny:opt", "hf_causal_lm": "tiny:opt", "flan_t5": "tiny:t5", "hf_seq2seq_lm": "tiny:t5"}


def _unique(reg) -> list[str]:
    """One name per registered object, the first it was registered under (aliases share the entry)."""
    return sorted({reg.names_of(reg.get(name))[0] for name in reg.list()})


# -- image encoders ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _unique(registry.image_encoders))
def test_image_encoder_contract(name):
    assert name in TINY_ENCODERS, f"add a tiny build recipe for image encoder {name!r} to TINY_ENCODERS"
    size, tiny = TINY_ENCODERS[name]
    cls = registry.image_encoders.get(name)
    params = inspect.signature(cls).parameters
    for arg in ("image_size", "precision", "freeze", "grad_checkpointing", "drop_path_rate", "pretrained"):
        assert arg in params, f"image encoder {name} must accept {arg}="
    torch.manual_seed(0)
    encoder = cls(image_size=size, precision="fp32", freeze=True, pretrained=None, **tiny)
    assert encoder.image_size == size and isinstance(encoder.num_features, int)
    tokens = encoder(torch.randn(2, 3, size, size))
    assert tokens.ndim == 3 and tokens.shape[0] == 2 and tokens.shape[2] == encoder.num_features
    assert tokens.dtype == torch.float32 and torch.isfinite(tokens).all()
    assert not any(p.requires_grad for p in encoder.parameters()), "freeze=True leaves no trainable parameter"
    with pytest.raises(ValueError, match="precision"):
        cls(image_size=size, precision="int8", pretrained=None, **tiny)


# -- LLM adapters ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _unique(registry.llms))
def test_llm_adapter_contract(name):
    assert name in TINY_LLMS, f"add the tiny LLM for adapter {name!r} to TINY_LLMS"
    llm = registry.llms.get(name)(TINY_LLMS[name], precision="fp32", freeze=True)
    assert isinstance(llm.hidden_size, int) and isinstance(llm.is_encoder_decoder, bool)
    assert not any(p.requires_grad for p in llm.parameters())
    llm.train()
    assert not llm.training, "a frozen LLM stays in eval mode"
    ids = llm.tokenizer(["a red circle", "two"], return_tensors="pt", padding=True).input_ids
    embeds = llm.embed_tokens(ids)
    assert embeds.shape == (*ids.shape, llm.hidden_size)
    mask = torch.ones(ids.shape, dtype=torch.long)
    labels = ids if not llm.is_encoder_decoder else ids[:, :2]
    out = llm(embeds, mask, labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)
    new = llm.generate(embeds, mask, num_beams=1, max_new_tokens=3)
    assert new.ndim == 2 and new.shape[0] == 2


# -- Q-Formers ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _unique(registry.qformers))
def test_qformer_contract(name):
    cls = registry.qformers.get(name)
    cfg = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               encoder_width=24, cross_attention_freq=2, num_query_token=4)
    torch.manual_seed(0)
    qformer = cls(cfg)
    queries = torch.randn(2, 4, 32)
    image = torch.randn(2, 5, 24)
    out = qformer.bert(query_embeds=queries, encoder_hidden_states=image,
                       encoder_attention_mask=torch.ones(2, 5, dtype=torch.long))
    assert out.last_hidden_state.shape == (2, 4, 32)
    assert torch.isfinite(out.last_hidden_state).all()


# -- models ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _unique(registry.models))
def test_model_zoo_contract(name):
    """Every zoo YAML exists, has a ``model:`` node and sets only keys the model's signatures define."""
    cls = registry.models.get(name)
    zoo = dict(getattr(cls, "PRETRAINED_MODEL_CONFIG_DICT", {}) or {})
    assert callable(getattr(cls, "from_config", None))
    for model_type in zoo:
        path = cls.default_config_path(model_type)
        assert os.path.isfile(path), f"{name}/{model_type}: {path} missing"
        node = OmegaConf.load(path).get("model")
        assert node is not None, f"{path}: no model: node"
        unknown = set(node) - model_config_keys(cls)
        assert not unknown, f"{path}: keys {sorted(unknown)} are no parameter of {cls.__name__}"


@pytest.mark.parametrize("name", _unique(registry.models))
def test_no_hand_list_repeats_a_signature(name):
    """``EXTRA_CONFIG_KEYS`` names only keys ``from_config`` reads itself, never a constructor parameter."""
    cls = registry.models.get(name)
    repeated = set(getattr(cls, "EXTRA_CONFIG_KEYS", ())) & set(init_parameters(cls))
    assert not repeated, f"{cls.__name__}.EXTRA_CONFIG_KEYS repeats constructor parameters {sorted(repeated)}"


def test_config_follows_the_constructor(monkeypatch, tmp_path):
    """A default changed in the signature is what from_config builds with, and a new parameter is a valid key."""
    from models.blip2_qformer import Blip2Qformer
    from runners.config import Config, ConfigError

    monkeypatch.setitem(Blip2Qformer.__init__.__kwdefaults__, "label_smoothing", 0.25)
    cfg = Blip2Qformer.load_zoo_config("tiny")
    assert "label_smoothing" not in cfg
    assert Blip2Qformer.from_config(cfg).label_smoothing == 0.25

    class Knobbed(Blip2Qformer):
        def __init__(self, *args, knob: int = 3, **kwargs):
            super().__init__(*args, **kwargs)
            self.knob = knob

    registry.models.add("knobbed_blip2", Knobbed, override=True)
    try:
        assert "knob" in Knobbed.config_keys() and "knob" not in Blip2Qformer.config_keys()
        base = {"model": {"arch": "knobbed_blip2", "model_type": "tiny"}, "run": {"task": "captioning"}}
        good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
        OmegaConf.save(OmegaConf.merge(base, {"model": {"knob": 5}}), good)
        OmegaConf.save(OmegaConf.merge(base, {"model": {"knobb": 5}}), bad)
        assert Config(str(good)).model.knob == 5
        with pytest.raises(ConfigError, match="Did you mean: knob"):
            Config(str(bad))
    finally:
        registry.models.unregister("knobbed_blip2")


# -- builders ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _unique(registry.builders))
def test_builder_contract(name):
    cls = registry.builders.get(name)
    types = dict(getattr(cls, "DATASET_CONFIG_DICT", {}) or {})
    assert types, f"builder {name} declares no DATASET_CONFIG_DICT"
    assert callable(getattr(cls, "build_datasets", None))
    valid = set(STANDARD_DATASET_KEYS) | set(getattr(cls, "EXTRA_CONFIG_KEYS", ()))
    for dataset_type in types:
        node = cls.default_config(dataset_type)  # the YAML's datasets.<name> node
        assert "build_info" in node, f"{name}/{dataset_type}: no build_info"
        unknown = set(node) - valid
        assert not unknown, f"{name}/{dataset_type}: keys {sorted(unknown)} that config validation would refuse"


# -- tasks -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _unique(registry.tasks))
def test_task_contract(name, tmp_path):
    cls = registry.tasks.get(name)
    assert issubclass(cls, BaseTask)
    for key, help_text in dict(getattr(cls, "RUN_KEYS", {}) or {}).items():
        assert isinstance(key, str) and isinstance(help_text, str) and help_text, (name, key)
    task = cls.setup_task(OmegaConf.create({"run": {"output_dir": str(tmp_path)}}))
    for method in ("build_model", "build_datasets", "train_step", "valid_step", "evaluation", "after_evaluation"):
        assert callable(getattr(task, method, None)), f"task {name} has no {method}"
