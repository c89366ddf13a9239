"""``--precision int8_dynamic`` of ``blip2-predict`` and the web server (``runners.inference.load_spec``): the ViT's,
Q-Former's and LLM's linear layers quantised, captions and answers from the CLI, ITM/ITC scores close to fp32 on the
same tiny weights, the user's ``--options`` winning over its parts, and a clear error off the CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from models.quantize import FrozenDynamicInt8Linear, Int8WeightOnlyLinear
from runners.inference import check_precision, load_spec
from runners.predict import main

# |int8_dynamic - fp32| bound of the tiny stage-1 model's ITM probabilities and ITC cosine similarities on the same
# random weights: ten times the largest difference seen (2e-4), room for other CPUs' fbgemm kernels
SCORE_ATOL = 2e-3


def _layers(module: nn.Module, cls: type) -> int:
    return sum(type(m) is cls for m in module.modules())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("int8")
    paths = []
    for i, colour in enumerate(("red", "blue", "green")):
        image = Image.new("RGB", (64, 64), (255, 255, 255))
        ImageDraw.Draw(image).ellipse((4 + 6 * i, 8, 40 + 6 * i, 44), fill=colour)
        paths.append(folder / f"{colour}.png")
        image.save(paths[-1])
    return paths


@pytest.mark.parametrize("spec", ["blip2_opt:tiny", "blip2_t5:tiny", "blip2:tiny"])
def test_int8_dynamic_quantises_vit_qformer_and_llm(spec):
    model = load_spec(spec, precision="int8_dynamic").model
    assert model.vit_quantization == "int8_dynamic" and model.qformer_quantization == "int8_dynamic"
    for part in (model.visual_encoder, model.Qformer, *([model.llm.model] if hasattr(model, "llm") else [])):
        assert _layers(part, FrozenDynamicInt8Linear) > 0 and _layers(part, nn.Linear) == 0, type(part).__name__
    assert not model.training and not any(p.requires_grad for p in model.Qformer.parameters())


def test_user_options_override_the_parts_of_int8_dynamic():
    """``--options`` keys win: an fp32 ViT and the weight-only int8 LLM, the Q-Former still int8_dynamic."""
    model = load_spec("blip2_opt:tiny", precision="int8_dynamic",
                      overrides={"vit_precision": "fp32", "llm_kwargs": {"quantization": "int8"}}).model
    assert _layers(model.visual_encoder, FrozenDynamicInt8Linear) == 0 and _layers(model.visual_encoder, nn.Linear)
    assert _layers(model.llm.model, Int8WeightOnlyLinear) > 0 and _layers(model.llm.model, FrozenDynamicInt8Linear) == 0
    assert _layers(model.Qformer, FrozenDynamicInt8Linear) > 0


def test_caption_and_vqa_cli_with_int8_dynamic(images, tmp_path):
    for spec in ("blip2_opt:tiny", "blip2_t5:tiny"):
        out = tmp_path / f"{spec.replace(':', '_')}.jsonl"
        assert main(["caption", "-m", spec, *map(str, images[:2]), "-o", str(out), "--precision", "int8_dynamic",
                     "--num-beams", "2", "--max-length", "4", "--quiet"]) == 0
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(recs) == 2 and all(isinstance(r["caption"], str) for r in recs)
    out = tmp_path / "answers.jsonl"
    assert main(["vqa", "-m", "blip2_t5:tiny", str(images[0]), "-q", "what colour?", "-o", str(out),
                 "--precision", "int8_dynamic", "--num-beams", "2", "--max-length", "3", "--quiet"]) == 0
    assert isinstance(json.loads(out.read_text())["answer"], str)


def test_itm_itc_scores_close_to_fp32(images):
    pil = [Image.open(p).convert("RGB") for p in images]
    texts = ["a red circle", "a blue circle", "a green square"]
    scores = {}
    for precision in ("fp32", "int8_dynamic"):
        torch.manual_seed(0)  # the same random tiny weights for both
        scores[precision] = load_spec("blip2:tiny", precision=precision).scores(pil, texts)
    for head in ("itm", "itc"):
        err = (scores["int8_dynamic"][head] - scores["fp32"][head]).abs().max().item()
        print(f"\n[int8 cli] tiny blip2 {head}: max |int8_dynamic - fp32| {err:.5f}")
        assert err < SCORE_ATOL, head


def test_int8_dynamic_loads_the_job_checkpoint_before_quantising(tmp_path):
    """A job's trained Q-Former weights are the ones quantised (not the fresh ones they replace)."""
    from omegaconf import OmegaConf

    from models import load_model
    from runners.checkpointing import save_checkpoint

    trained = load_model("blip2", "tiny")
    layer = trained.Qformer.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        layer.weight.mul_(-1.5)
    job = tmp_path / "job"
    save_checkpoint(job / "checkpoints" / "step_00000001",
                    {k: v.contiguous() for k, v in trained.trainable_state_dict().items()}, None, {"epoch": 0})
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "models/configs/blip2_tiny.yaml").model
    OmegaConf.save(OmegaConf.create({"model": OmegaConf.merge(cfg, {"arch": "blip2"})}), job / "config.yaml")
    model = load_spec(str(job), precision="int8_dynamic").model
    quantised = model.Qformer.bert.encoder.layer[0].attention.self.query
    assert type(quantised) is FrozenDynamicInt8Linear
    expected = layer.weight.detach()
    atol = float(expected.abs().max()) / 100  # int8 per-channel rounding: half a step of absmax / 127
    torch.testing.assert_close(quantised.weight().dequantize(), expected, atol=atol, rtol=0)


def test_int8_dynamic_off_the_cpu_is_a_clear_error(images, monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"--precision int8_dynamic runs on CPU only.*meta.*--device cpu.*fp32"):
        check_precision("int8_dynamic", torch.device("meta"))
    from models import zoo

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(zoo, "load_model_and_preprocess", no_build)
    with pytest.raises(ValueError, match="CPU only"):  # before any model is built
        load_spec("blip2_opt:tiny", device=torch.device("meta"), precision="int8_dynamic")
    assert main(["caption", "--device", "meta", "--precision", "int8_dynamic", str(images[0]), "--quiet"]) == 2
    assert "--precision int8_dynamic runs on CPU only" in capsys.readouterr().err


def test_int8_dynamic_on_a_hugging_face_directory(tmp_path_factory):
    """A Hugging Face BLIP-2 directory: its three parts quantised, its LLM still built from the directory's
    text_config (the quantisation key joins the llm_kwargs the directory gives)."""
    from tests.test_hf_parity import build_reference

    _, path, _ = build_reference("opt", tmp_path_factory)
    model = load_spec(str(path), precision="int8_dynamic").model
    for part in (model.visual_encoder, model.Qformer, model.llm.model):
        assert _layers(part, FrozenDynamicInt8Linear) > 0 and _layers(part, nn.Linear) == 0
    assert model.llm.model.config.hidden_size == 24  # the directory's text_config, not a default OPT
