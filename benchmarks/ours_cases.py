"""The benchmark cases run with this framework, from the same seeded HF checkpoint as `hf_cases.py`.

`amp: bf16` here means what it means in training: frozen encoder and LLM held in bf16, and the
step under bf16 autocast (CPU or GPU). fp32 keeps everything in fp32. `int8` quantises the frozen LLM's linear layers
weight-only; `int8_dynamic` those of the frozen LLM and ViT (fbgemm dynamic int8, CPU) and, in the generation cases
(d, e), the Q-Former's for inference (`quantize_for_inference`).
"""
from __future__ import annotations

from typing import Callable

import torch
from omegaconf import OmegaConf

from benchmarks import text as bench_text
from benchmarks.bench_config import optimizer_for
from benchmarks.feature_cache_case import setup_epoch
from benchmarks.text import autocast as _autocast, captions, images as _images
from models.quantize import quantize_for_inference
from runners.inference import check_precision, precision_overrides


def _load(ckpt: str, precision: str, arch: str | None = None, is_eval: bool = False, **overrides):
    """Our model built from the HF checkpoint directory; `arch` overrides the inferred one (stage 1)."""
    import registry
    from models.zoo import model_config_from_hf

    inferred, cfg = model_config_from_hf(ckpt)
    own_llm_kwargs = cfg.get("llm_kwargs", {})  # the checkpoint's, kept under the quantization key added here
    if precision == "int8":  # weight-only int8: the frozen LLM's linear layers only (not an inference --precision)
        parts = {"llm_kwargs": {**own_llm_kwargs, "quantization": precision}}
    else:  # fp32, bf16, int8_dynamic: the parts blip2-predict's --precision sets (runners.inference)
        parts = precision_overrides(precision, check_precision(precision, bench_text.DEVICE),
                                    {"llm_kwargs": own_llm_kwargs})
    cfg = OmegaConf.create(dict(cfg, **parts, **overrides))
    model = registry.models.get(arch or inferred).from_config(cfg).to(bench_text.DEVICE)
    model.train(not is_eval)
    return model


def _train_step(model, samples: dict, precision: str) -> Callable[[], float]:
    optimizer = optimizer_for(model)

    def step() -> float:
        with _autocast(precision):
            loss = model(samples)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def setup(case: str, ckpt: str, dims: dict, precision: str, work_dir: str | None = None) -> Callable:
    """A zero-argument callable doing one unit of work of `case` (see benchmarks/run.py)."""
    batch, size = dims["batch"], dims["image_size"]
    if case == "a":
        # Stage 1 from the retrieval checkpoint; the ITG head (absent from HF checkpoints) starts tied/random.
        model = _load(ckpt, precision, arch="blip2", itm_negatives="multinomial", strict_load=False)
        samples = {"image": _images(batch, size), "text_input": captions(batch),
                   "image_id": torch.arange(batch)}
        return _train_step(model, samples, precision)
    if case == "b":
        model = _load(ckpt, precision)
        return _train_step(model, {"image": _images(batch, size), "text_input": captions(batch)}, precision)
    if case == "c":
        model = _load(ckpt, precision)
        samples = {"image": _images(batch, size), "text_input": [""] * batch, "text_output": captions(batch)}
        return _train_step(model, samples, precision)
    if case in ("d", "e"):
        model = _load(ckpt, precision, is_eval=True)
        if precision == "int8_dynamic":  # at inference the Q-Former too (models/quantize.py)
            quantize_for_inference(model, precision)
        n = dims["gen_new_tokens"]
        samples = {"image": _images(dims["gen_batch"], size, seed=1), "prompt": ""}

        def generate():
            with _autocast(precision):
                return model.generate(samples, num_beams=dims["gen_beams"], max_length=n, min_length=n)

        return generate
    if case.startswith("f_"):
        model = _load(ckpt, precision, is_eval=True, tokenizer=ckpt)  # the checkpoint's tokenizer, as HF and LAVIS read
        mode = case[2:]
        samples = {"image": _images(batch, size, seed=2), "text_input": captions(batch, seed=2)}
        if mode == "text":
            samples.pop("image")

        def features():
            with _autocast(precision):
                return model.extract_features(samples, mode=mode)

        return features
    if case == "g":
        return _retrieval(ckpt, dims, precision)
    if case in ("h_uncached", "h_cached"):
        return setup_epoch(_load(ckpt, precision), dims, precision, work_dir, cached=case == "h_cached")
    raise ValueError(f"unknown benchmark case {case!r}")


def _retrieval(ckpt: str, dims: dict, precision: str) -> Callable:
    """(g) through the retrieval task's own code path: ITC matrix, top-k ITM re-rank, both directions."""
    from tasks.retrieval import encode_texts, itc_similarity, rerank_scores

    model = _load(ckpt, precision, is_eval=True, tokenizer=ckpt)
    n_img, n_txt, k = dims["retrieval_images"], dims["retrieval_texts"], dims["k_test"]
    images = _images(n_img, dims["image_size"], seed=3)
    texts = captions(n_txt, seed=3)
    batch = dims["batch"]
    device = torch.device("cpu")

    @torch.no_grad()
    def step():
        with _autocast(precision):
            text_feat, text_ids, text_atts = encode_texts(model, texts, 256, device)
            feats, embeds = zip(*(model.image_retrieval_features(images[i : i + batch]) for i in range(0, n_img, batch)))
            image_feats, image_embeds = torch.cat(feats).float(), torch.cat(embeds)
            sims = itc_similarity(image_feats, text_feat)
            return rerank_scores(model, sims, image_embeds, text_ids, text_atts, k)

    return step
