"""Quantised frozen parts on CPU: the int8 layer computes the weight-only int8 formula, an int8 LLM generates and its
logits stay within a stated tolerance of fp32, a stage-2 model runs with it, bitsandbytes flags fail clearly here; an
int8_dynamic frozen ViT stays within a stated tolerance of fp32, loads checkpoints and trains stage 1 and 2."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import registry
from models.quantize import Int8WeightOnlyLinear

# Relative logit error ||int8 - fp32|| / ||fp32|| of the tiny LLMs on random soft prompts (measured: weight-only int8
# 1.2% (OPT) and 2.0% (T5); dynamic int8, which also rounds activations and quantises OPT's output projection, 3.8%
# and 5.0%).
TOLERANCE = {"int8": 0.03, "int8_dynamic": 0.08}


def test_int8_linear_is_the_weight_only_formula():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    q = Int8WeightOnlyLinear(linear)
    x = torch.randn(2, 5, 64)
    w = linear.weight.detach()
    scale = w.abs().amax(dim=1) / 127  # symmetric per output channel
    dequant = torch.round(w / scale[:, None]).clamp(-127, 127) * scale[:, None]
    torch.testing.assert_close(q(x), x @ dequant.T + linear.bias.detach(), atol=1e-5, rtol=1e-5)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (48, 64)
    x.requires_grad_(True)
    q(x).sum().backward()  # the input's gradient (the weights are frozen buffers)
    torch.testing.assert_close(x.grad, torch.ones(2, 5, 48) @ dequant, atol=1e-5, rtol=1e-5)
    x = x.detach()
    assert (q(x) - linear(x)).abs().max() < 0.01 * linear(x).abs().max()


@pytest.mark.parametrize("kind,name", [("opt", "tiny:opt"), ("flan_t5", "tiny:t5")])
@pytest.mark.parametrize("method", ["int8", "int8_dynamic"])
def test_int8_llm_logits_close_to_fp32_and_generates(kind, name, method):
    ref = registry.llms.get(kind)(name, precision="fp32")
    quant = registry.llms.get(kind)(name, precision="fp32", quantization=method)
    linears = [m for m in quant.model.modules() if type(m) is nn.Linear]
    tied = quant.model.get_output_embeddings() if kind == "opt" and method == "int8" else None
    assert linears == ([tied] if tied is not None else [])  # every other linear layer was replaced
    embed = quant.model.get_input_embeddings().weight
    assert embed.dtype == torch.float32 and torch.equal(embed, ref.model.get_input_embeddings().weight)
    if kind == "opt":  # int8 keeps OPT's tied output projection; int8_dynamic (inference only) quantises a copy
        head = quant.model.get_output_embeddings()
        assert (head.weight is embed) == (method == "int8")
    torch.manual_seed(1)
    embeds = torch.randn(3, 7, ref.hidden_size) * 0.5
    mask = torch.ones(3, 7, dtype=torch.long)
    labels = torch.randint(3, 100, (3, 5)) if ref.is_encoder_decoder else None
    with torch.no_grad():
        a = ref(embeds, mask, labels=labels).logits
        b = quant(embeds, mask, labels=labels).logits
    err = float((a - b).norm() / a.norm())
    print(f"\n[quantize] {kind} {method}: relative logit error {err:.4f}")
    assert 0 < err < TOLERANCE[method]
    ids = quant.generate(embeds, mask, num_beams=2, max_new_tokens=5, min_new_tokens=5)
    assert ids.shape[0] == 3 and ids.shape[1] >= 5


def test_stage2_model_with_int8_llm():
    from models import load_model

    torch.manual_seed(0)
    model = load_model("blip2_opt", "tiny", is_eval=True, llm_kwargs={"quantization": "int8"})
    assert any(isinstance(m, Int8WeightOnlyLinear) for m in model.llm.modules())
    assert not any(k.startswith("opt_model.") for k in model.trainable_state_dict())
    captions = model.generate({"image": torch.randn(2, 3, 64, 64)}, num_beams=2, max_length=5)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    loss = model({"image": torch.randn(2, 3, 64, 64), "text_input": ["a red circle", "a blue square"]})["loss"]
    loss.backward()  # gradients reach the Q-Former through the int8 LLM
    assert model.query_tokens.grad is not None and model.query_tokens.grad.abs().sum() > 0


def test_bad_quantization_options_are_clear():
    with pytest.raises(ValueError, match="int8, int8_dynamic"):
        registry.llms.get("opt")("tiny:opt", quantization="int4")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU.*quantization=int8"):
            registry.llms.get("opt")("tiny:opt", load_in_8bit=True)
        with pytest.raises(ValueError, match="load_in_4bit needs a CUDA GPU"):
            registry.llms.get("opt")("tiny:opt", load_in_4bit=True)


# ---- a frozen image encoder with fbgemm dynamic int8 linear layers (model.vit_precision: int8_dynamic) ----
# Relative error ||int8 - fp32|| / ||fp32|| of the tiny ViT's features and of the tiny Q-Former's soft prompt on random
# images; a tenth of this bound or less on the tiny models (the BENCH model's: benchmarks/RESULTS.md).
IMAGE_PATH_TOLERANCE = 0.01


def _vit_features(model, images):
    with torch.no_grad():
        return model.frozen_image_features(images)


def test_int8_dynamic_vit_is_quantised_close_to_fp32_and_loads_fp32_weights():
    from models import load_model
    from models.quantize import FrozenDynamicInt8Linear, quantize_image_encoder

    torch.manual_seed(0)
    ref = load_model("blip2", "tiny", is_eval=True)
    torch.manual_seed(1)  # other weights, replaced by ref's through a state dict holding the fp32 ViT (HF layout)
    quant = load_model("blip2", "tiny", is_eval=True, vit_precision="int8_dynamic")
    n_linear = sum(type(m) is nn.Linear for m in ref.visual_encoder.modules())
    assert sum(type(m) is FrozenDynamicInt8Linear for m in quant.visual_encoder.modules()) == n_linear > 0
    assert not any(type(m) is nn.Linear for m in quant.visual_encoder.modules())
    assert quant.visual_encoder.blocks[0].attn.qkv.weight().qscheme() == torch.per_channel_affine
    assert quant.load_state_dict(ref.state_dict(), strict=False).unexpected_keys == []
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    a, b = _vit_features(ref, images), _vit_features(quant, images)
    err = float((a - b).norm() / a.norm())
    print(f"\n[quantize] tiny ViT int8_dynamic: relative feature error {err:.4f}")
    assert 0 < err < IMAGE_PATH_TOLERANCE
    direct = copy.deepcopy(ref.visual_encoder)  # quantised after its weights are in: the same layers
    quantize_image_encoder(direct, "int8_dynamic")
    with torch.no_grad():
        torch.testing.assert_close(direct(images), b, rtol=0, atol=0)
    # a state dict without the frozen ViT (a trainable-only checkpoint) leaves the int8 layers as they are
    quant.load_state_dict(quant.trainable_state_dict(), strict=False)
    torch.testing.assert_close(_vit_features(quant, images), b, rtol=0, atol=0)


def test_int8_dynamic_vit_refusals_are_clear():
    from models import load_model

    with pytest.raises(ValueError, match=r"vit_precision=int8_dynamic .*needs freeze_vit: true"):
        load_model("blip2", "tiny", vit_precision="int8_dynamic", freeze_vit=False)
    with pytest.raises(ValueError, match=r"vit_precision must be one of auto, fp32, bf16, fp16, int8_dynamic; "
                                         r"got 'int8'"):
        load_model("blip2", "tiny", vit_precision="int8")
    model = load_model("blip2", "tiny", vit_precision="int8_dynamic")
    with pytest.raises(ValueError, match=r"vit_precision=int8_dynamic runs on CPU only.*images are on meta"):
        model.frozen_image_features(torch.empty(1, 3, 64, 64, device="meta"))


def test_training_steps_with_an_int8_dynamic_vit(tmp_path):
    """Stage 1 and stage 2 train with it (no gradient reaches the ViT); checkpoints hold no ViT tensor; a trainable-only
    checkpoint loads back; the feature cache keys it apart from the fp32 encoder; a bf16 autocast step runs."""
    from models import load_model

    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    samples = {"image": images, "text_input": ["a red circle", "a blue square"], "text_output": ["red", "blue"]}
    for arch in ("blip2", "blip2_t5"):
        torch.manual_seed(0)
        model = load_model(arch, "tiny", vit_precision="int8_dynamic").train()
        assert not model.visual_encoder.training
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        loss = model(samples)["loss"]
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and model.query_tokens.grad.abs().sum() > 0
        state = model.trainable_state_dict()
        assert state and not any(k.startswith("visual_encoder.") for k in state)
        result = model.load_state_dict(state, strict=False)  # as a resume or checkpoint_best loads it
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert result.unexpected_keys == [] and not trainable & set(result.missing_keys)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(model(samples)["loss"].float())
    fp32 = load_model("blip2", "tiny")
    fp32.enable_feature_cache(str(tmp_path))
    model.enable_feature_cache(str(tmp_path))
    assert model.feature_cache.dir != fp32.feature_cache.dir
    first = _vit_features(model, images)
    torch.testing.assert_close(_vit_features(model, images), first, rtol=0, atol=0)


def test_int8_dynamic_model_loads_a_trainable_only_checkpoint():
    """A job's checkpoint (trainable tensors only) loads into a model whose frozen LLM and ViT are int8_dynamic, as
    ``load_spec`` with ``--options`` does; torch's own dynamic int8 layer fails on a state dict without its keys."""
    from models import load_model

    torch.manual_seed(0)
    trained = load_model("blip2_t5", "tiny", is_eval=True)
    quant = load_model("blip2_t5", "tiny", is_eval=True, vit_precision="int8_dynamic",
                       llm_kwargs={"quantization": "int8_dynamic"})
    assert quant.load_state_dict(trained.trainable_state_dict(), strict=False).unexpected_keys == []
    torch.testing.assert_close(quant.query_tokens, trained.query_tokens)
    captions = quant.generate({"image": torch.randn(2, 3, 64, 64)}, num_beams=2, max_length=4)
    assert len(captions) == 2


def test_quantize_for_inference_quantises_the_qformer_and_forbids_training():
    from models import load_model
    from models.quantize import FrozenDynamicInt8Linear, quantize_for_inference

    torch.manual_seed(0)
    ref = load_model("blip2_t5", "tiny", is_eval=True)
    quant = copy.deepcopy(ref)
    count = quantize_for_inference(quant)
    assert count == sum(type(m) is FrozenDynamicInt8Linear for m in quant.Qformer.modules()) > 0
    assert not any(type(m) is nn.Linear for m in quant.Qformer.modules())
    assert not any(p.requires_grad for p in quant.Qformer.parameters())
    samples = {"image": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))}
    with torch.no_grad():
        a, b = ref.soft_prompt(samples), quant.soft_prompt(samples)
    err = float((a - b).norm() / a.norm())
    print(f"\n[quantize] tiny Q-Former int8_dynamic: relative soft-prompt error {err:.4f}")
    assert 0 < err < IMAGE_PATH_TOLERANCE
    assert len(quant.generate(samples, num_beams=2, max_length=4)) == 2
    with pytest.raises(RuntimeError, match="quantize_for_inference.*cannot train"):
        quant.train()
    with pytest.raises(ValueError, match="must be int8_dynamic; got 'int8'"):
        quantize_for_inference(copy.deepcopy(ref), "int8")
