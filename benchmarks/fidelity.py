"""Differences from the released BLIP-2 code (LAVIS 1.0.2 / transformers' Blip2*), before and after issue 17.

"Before" is each old behaviour, still reachable as an option; "after" is the default. Every reference is independent
of our code paths (transformers' classes on shared weights, or the released formulas as the tests write them out):

1. OPT stage-2 loss, empty prompt: |ours - Blip2ForConditionalGeneration(labels)| and the rel. L2 of the projection's
   gradient (before: ``mask_bos=True``).
2. ITC gradient: rel. L2 of ``text_proj.weight``'s gradient vs LAVIS's ITC (gathered side detached), ITC alone
   (before: ``itc_gather_grad=True``).
3. Flan-T5 logits: max |ours - transformers' T5 built as LAVIS builds it (dense_act_fn gelu)| (before: keep gelu_new).
4. CLIP ViT-L features: max |ours - OpenAI CLIP's forward through resblock 21| (before: depth 23), width 32.
5. VQA accuracy of "2" against 8 x "two" + 2 x "2" (official 0.6; before: full normalisation of human answers).

    PYTHONPATH=$PWD python -m benchmarks.fidelity
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch


class _Factory:  # the tmp_path_factory the test helpers expect
    def __init__(self, root: Path) -> None:
        self.root, self.count = root, 0

    def mktemp(self, name: str) -> Path:
        self.count += 1
        path = self.root / f"{name}{self.count}"
        path.mkdir()
        return path


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def opt_loss(root: Path) -> tuple[tuple[float, float], tuple[float, float]]:
    from models import load_hf_blip2
    from tests.test_hf_parity import TEXTS, build_reference, opt_caption_batch, pixels

    hf, path, tok = build_reference("opt", _Factory(root))
    ours = load_hf_blip2(str(path))
    ids, mask, labels = opt_caption_batch(hf, ours, tok)
    hf.zero_grad()
    expected = hf(pixel_values=pixels(), input_ids=ids, attention_mask=mask, labels=labels).loss
    expected.backward()
    hf_grad = hf.language_projection.weight.grad.clone()
    out = []
    for mask_bos in (True, False):
        ours.mask_bos = mask_bos
        ours.zero_grad()
        loss = ours({"image": pixels(), "text_input": TEXTS})["loss"]
        loss.backward()
        out.append((abs(loss.item() - expected.item()), _rel(ours.opt_proj.weight.grad, hf_grad)))
    return out[0], out[1]


def itc_grad() -> tuple[float, float]:
    from models.blip2_qformer import Blip2Qformer
    from tests.test_blip2_stage1 import _grads, _lavis_itc_loss, _no_dropout, _samples, _tiny_cfg

    torch.manual_seed(0)
    model = Blip2Qformer.from_config(_tiny_cfg(loss_weights={"itc": 1, "itm": 0, "itg": 0}))
    _no_dropout(model)
    model.train()
    samples = _samples()
    reference = _grads(model, _lavis_itc_loss(model, samples))["text_proj.weight"]
    out = []
    for gather_grad in (True, False):
        model.itc_gather_grad = gather_grad
        out.append(_rel(_grads(model, model(samples)["loss"])["text_proj.weight"], reference))
    return out[0], out[1]


def t5_logits() -> tuple[float, float]:
    from transformers import T5Config, T5ForConditionalGeneration

    from models.blip2_t5 import Blip2T5
    from tests.test_blip2_stage2 import images

    samples = {"image": images(2), "text_input": ["question: what is it?", "a photo of"],
               "text_output": ["a red circle", "two squares"]}
    out = []
    for act in (None, "gelu"):
        torch.manual_seed(0)
        model = Blip2T5.from_pretrained("tiny", llm_kwargs={"dense_act_fn": act}).eval()
        config = T5Config.from_pretrained(model.llm.model_name_or_path)
        config.dense_act_fn = "gelu"  # LAVIS blip2_t5.py
        t5 = T5ForConditionalGeneration.from_pretrained(model.llm.model_name_or_path, config=config).eval()
        with torch.no_grad():
            got = model(samples, return_logits=True)["logits"]
            inputs = model.lm_inputs(model.soft_prompt(samples), samples["text_input"], samples["text_output"])
            expected = t5(**inputs).logits
        valid = inputs["decoder_attention_mask"].bool()
        out.append(float((got[valid] - expected[valid]).abs().max()))
    return out[0], out[1]


def clip_features(root: Path) -> tuple[float, float]:
    from models.image_encoders import ClipViTL
    from tests.test_image_encoders import images, openai_clip_reference, random_openai_clip_visual

    sd = random_openai_clip_visual(width=32, blocks=24)  # the full OpenAI tower, as clip_vit_L.pth holds it
    torch.save(sd, root / "clip_vit_L.pth")
    with torch.no_grad():
        expected = openai_clip_reference(sd, images(), heads=2, depth=21)  # LAVIS: layers=22 -> 21 resblocks
        out = []
        for depth in (23, 21):
            enc = ClipViTL(image_size=28, embed_dim=32, num_heads=2, depth=depth, pretrained=str(root / "clip_vit_L.pth"))
            out.append(float((enc(images()) - expected).abs().max()))
    return out[0], out[1]


def vqa_score() -> tuple[float, float]:
    from tasks.metrics.vqa import vqa_accuracy

    humans = ["two"] * 8 + ["2"] * 2
    return vqa_accuracy("2", humans, normalize_references=True), vqa_accuracy("2", humans)


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (loss_b, grad_b), (loss_a, grad_a) = opt_loss(root)
        rows = [
            ("1 OPT stage-2 loss, empty prompt", "abs loss diff", loss_b, loss_a),
            ("1 OPT stage-2 loss, empty prompt", "opt_proj grad rel-L2", grad_b, grad_a),
            ("2 ITC gradient (ITC alone)", "text_proj grad rel-L2", *itc_grad()),
            ("3 Flan-T5 activation", "max abs logit diff", *t5_logits()),
            ("4 CLIP ViT-L depth", "max abs feature diff", *clip_features(root)),
            ("5 VQA accuracy (official: 0.6)", "score", *vqa_score()),
        ]
    print("| item | measure | before | after |")
    print("|---|---|---|---|")
    for item, what, before, after in rows:
        print(f"| {item} | {what} | {before:.3g} | {after:.3g} |")


if __name__ == "__main__":
    main()
