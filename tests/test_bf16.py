"""bf16 on every path, on tiny shapes: the same model with frozen parts stored in bf16 and the step under bf16
autocast (what ``vit_precision: bf16``, ``llm_precision: bf16`` and ``run.amp: bf16`` give) against fp32.

Tolerances: bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2 %) and the tiny models chain a few dozen
roundings, so losses are compared to 3 % relative, L2-normalised features and ITM logits to 0.05 absolute. The
trainable part keeps fp32 master weights and fp32 gradients. bf16 speed is measured by the benchmark, not here
(on a CPU without native bf16 it is emulated, ~400x slower than fp32).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models.blip2_opt import Blip2OPT
from models.blip2_qformer import Blip2Qformer
from models.blip2_t5 import Blip2T5

TEXTS = ["a red circle", "a blue square to the left of a green star"]
LOSS_RTOL = 3e-2
FEATURE_ATOL = 5e-2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout_p"):
            module.dropout_p = 0.0
    return model


def model_pair(cls, precision: str = "bf16", device: str = "cpu", **overrides):
    """(fp32 model, the same weights with the frozen parts stored in ``precision``) on ``device``, dropout off."""
    torch.manual_seed(0)
    ref = _no_dropout(cls.from_pretrained("tiny", **overrides)).to(device)
    half = {"vit_precision": precision}
    if cls is not Blip2Qformer:
        half["llm_precision"] = precision
    torch.manual_seed(0)
    low = _no_dropout(cls.from_pretrained("tiny", **overrides, **half)).to(device)
    low.load_state_dict(ref.state_dict())
    return ref, low



def _images(n=2):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _frozen_dtypes(model):
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    return frozen, trainable


class _CastCounter(TorchDispatchMode):
    """Counts dtype conversions whose source is one of ``watched`` (the frozen weights)."""

    def __init__(self, watched):
        super().__init__()
        self.watched = {w.data_ptr() for w in watched}
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype) and args:
            src = args[0]
            if isinstance(src, torch.Tensor) and src.data_ptr() in self.watched:
                self.casts += 1
        return func(*args, **(kwargs or {}))


def test_stage1_itc_itm_itg_bf16_close_to_fp32():
    ref, low = model_pair(Blip2Qformer, itm_negatives="hardest")
    frozen, trainable = _frozen_dtypes(low)
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}  # fp32 master weights for the Q-Former
    samples = {"image": _images(), "text_input": TEXTS, "image_id": torch.tensor([0, 1])}
    ref.train(), low.train()
    out_ref = ref(samples)
    with bf16():
        out_low = low(samples)
    for key in ("loss_itc", "loss_itm", "loss_itg", "loss"):
        assert out_low[key].dtype == torch.float32
        torch.testing.assert_close(out_low[key].detach(), out_ref[key].detach(), rtol=LOSS_RTOL, atol=0)
    out_low["loss"].backward()
    grads = [p.grad for p in low.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in low.parameters() if not p.requires_grad)


def test_stage1_features_and_itm_rerank_bf16_close_to_fp32():
    ref, low = model_pair(Blip2Qformer)
    ref.eval(), low.eval()
    samples = {"image": _images(), "text_input": TEXTS}
    for mode, field in (("image", "image_embeds_proj"), ("text", "text_embeds_proj"),
                        ("multimodal", "multimodal_embeds")):
        expected = getattr(ref.extract_features(samples, mode), field)
        with bf16():
            got = getattr(low.extract_features(samples, mode), field)
        torch.testing.assert_close(got.float(), expected, rtol=0, atol=FEATURE_ATOL * max(1.0, expected.abs().max()))
    with torch.no_grad():
        _, embeds = ref.image_retrieval_features(samples["image"])
        _, ids, atts = ref.text_retrieval_features(TEXTS)
        index = torch.tensor([1, 0, 1, 0])
        rows = torch.tensor([0, 0, 1, 1])
        expected = ref.itm_scores(embeds[index], ids[rows], atts[rows])
        with bf16():
            _, low_embeds = low.image_retrieval_features(samples["image"])
            batched = low.itm_scores(low_embeds, ids[rows], atts[rows], image_index=index)
            per_pair = low.itm_scores(low_embeds[index], ids[rows], atts[rows])
    torch.testing.assert_close(batched.float(), expected, rtol=0, atol=FEATURE_ATOL)
    torch.testing.assert_close(batched.float(), per_pair.float(), rtol=0, atol=FEATURE_ATOL)


@pytest.mark.parametrize("cls", [Blip2OPT, Blip2T5])
def test_stage2_loss_bf16_close_to_fp32_and_frozen_weights_never_cast(cls):
    ref, low = model_pair(cls)
    frozen, trainable = _frozen_dtypes(low)
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    samples = {"image": _images(), "text_input": TEXTS}
    ref.train(), low.train()
    expected = ref(samples)["loss"]
    frozen_params = [p for p in low.parameters() if not p.requires_grad]
    counter = _CastCounter(frozen_params)
    with bf16(), counter:
        loss = low(samples)["loss"]
    assert counter.casts == 0  # stored in bf16 once: no per-step conversion of a frozen weight
    fp32_counter = _CastCounter([p for p in ref.parameters() if not p.requires_grad])
    with bf16(), fp32_counter, torch.no_grad():
        ref(samples)
    assert fp32_counter.casts > 0  # the counter sees autocast's per-step casts of fp32 frozen weights
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=LOSS_RTOL, atol=0)
    loss.backward()
    grads = [p.grad for p in low.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("cls", [Blip2OPT, Blip2T5])
def test_generation_bf16_first_step_close_to_fp32(cls):
    """Beam search runs end to end in bf16; the LLM's next-token log-probabilities after the soft prompt (what
    the first decoding step ranks) agree with fp32, and greedy decoding picks the same first token."""
    ref, low = model_pair(cls)
    ref.eval(), low.eval()
    samples = {"image": _images(), "prompt": ""}
    with bf16():
        captions = low.generate(samples, num_beams=2, max_length=4, min_length=4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    with torch.no_grad():
        expected = _first_step_log_probs(ref, samples)
        with bf16():
            got = _first_step_log_probs(low, samples)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0.1)
    top_ref, top_low = expected.topk(2, dim=-1).values, got.argmax(-1)
    decisive = (top_ref[:, 0] - top_ref[:, 1]) > 0.1  # a near tie may flip under bf16 rounding
    assert torch.equal(got.argmax(-1)[decisive], expected.argmax(-1)[decisive])
    assert top_low.shape == (2,)


def _first_step_log_probs(model, samples):
    soft = model.soft_prompt(samples)
    prompts = [""] * soft.shape[0]
    if model.llm.is_encoder_decoder:
        return model.first_token_log_probs(soft, prompts)
    embeds, atts = model.generation_inputs(soft, prompts)
    return model.llm(embeds, atts).logits[:, -1].float().log_softmax(-1)


def test_bf16_model_copy_keeps_bf16_storage():
    """Frozen bf16 storage survives deepcopy / train() / eval() (no silent upcast)."""
    _, low = model_pair(Blip2OPT)
    clone = copy.deepcopy(low).train().eval()
    frozen, _ = _frozen_dtypes(clone)
    assert frozen == {torch.bfloat16}
