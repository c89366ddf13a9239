"""The benchmark cases run with Hugging Face `transformers` BLIP-2, for the side-by-side ratio.

Each `setup_*` returns a zero-argument callable doing one unit of work (one training step, one
generate call, ...). The inputs are the same as in `ours_cases.py`: same checkpoint, same images,
same captions, padding to the longest caption in the batch.
"""
from __future__ import annotations

from typing import Callable

import torch

from benchmarks import text as bench_text
from benchmarks.text import autocast as _autocast, captions, images as _images


def _load(kind: str, ckpt, precision: str):
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    cls = Blip2ForImageTextRetrieval if kind == "retrieval" else Blip2ForConditionalGeneration
    model = cls.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    frozen = [model.vision_model] + ([model.language_model] if kind != "retrieval" else [])
    for module in frozen:
        module.requires_grad_(False)
        if precision == "bf16":
            module.to(torch.bfloat16)
    return model.to(bench_text.DEVICE), tokenizer


def _on_device(value):
    """Tensors (also inside dicts / BatchEncodings) moved to the benchmark device."""
    if isinstance(value, torch.Tensor):
        return value.to(bench_text.DEVICE)
    if hasattr(value, "items"):
        return {k: _on_device(v) for k, v in value.items()}
    return value


def _llm_inputs(model, tokenizer, texts: list[str], kind: str):
    """input_ids with the image placeholders first, then the caption (OPT: + "\\n"), right-padded."""
    n_query = model.config.num_query_tokens
    image_token = model.config.image_token_index
    if kind == "opt":
        texts = [t + "\n" for t in texts]
    enc = tokenizer(texts, padding="longest", return_tensors="pt")
    batch = enc.input_ids.shape[0]
    if kind == "t5":
        return enc
    ids = torch.cat([torch.full((batch, n_query), image_token), enc.input_ids], dim=1)
    mask = torch.cat([torch.ones(batch, n_query, dtype=torch.long), enc.attention_mask], dim=1)
    return ids, mask


def setup_train_step(kind: str, ckpt, dims: dict, precision: str) -> Callable[[], float]:
    """(b)/(c): one stage-2 training step (forward with LM loss, backward, AdamW) on the trainable parts."""
    model, tokenizer = _load(kind, ckpt, precision)
    model.train()
    model.vision_model.eval()
    model.language_model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: what transformers' Trainer uses by default with torch >= 2.8 (optim="adamw_torch_fused")
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.98), weight_decay=0.05, fused=True)
    batch = dims["batch"]
    images = _images(batch, dims["image_size"])
    texts = captions(batch)
    if kind == "opt":
        input_ids, attention_mask = _llm_inputs(model, tokenizer, texts, kind)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, : model.config.num_query_tokens] = -100
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    else:
        n_query = model.config.num_query_tokens
        prompt = tokenizer([""] * batch, return_tensors="pt")  # T5 encoder text: just </s>
        image_ids = torch.full((batch, n_query), model.config.image_token_index)
        input_ids = torch.cat([image_ids, prompt.input_ids], dim=1)
        target = tokenizer(texts, padding="longest", return_tensors="pt")
        labels = target.input_ids.masked_fill(target.attention_mask == 0, -100)
        kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
                      decoder_attention_mask=target.attention_mask)

    kwargs = _on_device(kwargs)

    def step() -> float:
        with _autocast(precision):
            loss = model(pixel_values=images, **kwargs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def setup_generate(kind: str, ckpt, dims: dict, precision: str) -> Callable[[], list]:
    """(d)/(e): beam search with exactly `gen_new_tokens` new tokens for `gen_batch` images."""
    model, tokenizer = _load(kind, ckpt, precision)
    model.eval()
    batch = dims["gen_batch"]
    images = _images(batch, dims["image_size"], seed=1)
    n = dims["gen_new_tokens"]
    # An empty prompt, as BLIP-2 captioning uses: OPT sees "</s>", T5's encoder sees "</s>".
    prompt = tokenizer([""] * batch, return_tensors="pt").input_ids
    image_ids = torch.full((batch, model.config.num_query_tokens), model.config.image_token_index)
    input_ids = _on_device(torch.cat([image_ids, prompt], dim=1))

    @torch.no_grad()
    def step():
        with _autocast(precision):
            out = model.generate(pixel_values=images, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 num_beams=dims["gen_beams"], max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out.shape

    return step


def setup_itm_forward(ckpt, dims: dict, precision: str) -> Callable[[], torch.Tensor]:
    """(f): the ITM forward of `Blip2ForImageTextRetrieval` (image + text + multimodal in one call)."""
    model, tokenizer = _load("retrieval", ckpt, precision)
    model.eval()
    batch = dims["batch"]
    images = _images(batch, dims["image_size"], seed=2)
    enc = tokenizer(captions(batch, seed=2), padding="longest", truncation=True,
                    max_length=dims["max_txt_len"], return_tensors="pt").to(bench_text.DEVICE)

    @torch.no_grad()
    def step():
        with _autocast(precision):
            return model(pixel_values=images, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                         use_image_text_matching_head=True).logits_per_image

    return step


def setup_features(mode: str, ckpt, dims: dict, precision: str) -> Callable[[], torch.Tensor]:
    """(f) image / text: the unimodal passes of `Blip2ForImageTextRetrieval` (as its ITC scoring runs them),
    with the L2-normalised projections, the same work as our ``extract_features(mode=...)``."""
    model, tokenizer = _load("retrieval", ckpt, precision)
    model.eval()
    batch = dims["batch"]
    images = _images(batch, dims["image_size"], seed=2)
    texts = captions(batch, seed=2)
    normalize = torch.nn.functional.normalize

    @torch.no_grad()
    def image():
        with _autocast(precision):
            emb = model.vision_model(pixel_values=images).last_hidden_state
            q = model.query_tokens.expand(emb.shape[0], -1, -1)
            out = model.qformer(query_embeds=q, encoder_hidden_states=emb,
                                encoder_attention_mask=torch.ones(emb.shape[:2], dtype=torch.long,
                                                                  device=emb.device)).last_hidden_state
            return normalize(model.vision_projection(out), dim=-1)

    @torch.no_grad()
    def text():
        with _autocast(precision):
            enc = tokenizer(texts, padding="longest", truncation=True, max_length=dims["max_txt_len"],
                            return_tensors="pt").to(bench_text.DEVICE)
            hidden = model.qformer(query_embeds=model.embeddings(input_ids=enc.input_ids), query_length=0,
                                   attention_mask=enc.attention_mask).last_hidden_state
            return normalize(model.text_projection(hidden), dim=-1)

    return {"image": image, "text": text}[mode]


def setup_retrieval(ckpt, dims: dict, precision: str) -> Callable[[], tuple]:
    """(g): ITC matrix + ITM re-rank of the top k_test, both directions, built from HF modules."""
    model, tokenizer = _load("retrieval", ckpt, precision)
    model.eval()
    n_img, n_txt, k = dims["retrieval_images"], dims["retrieval_texts"], dims["k_test"]
    images = _images(n_img, dims["image_size"], seed=3)
    texts = captions(n_txt, seed=3)
    batch = dims["batch"]

    @torch.no_grad()
    def itm(image_embeds, ids, mask):
        q = model.query_tokens.expand(ids.shape[0], -1, -1)
        embeds = model.embeddings(input_ids=ids, query_embeds=q)
        full_mask = torch.cat([torch.ones(q.shape[:2], dtype=torch.long), mask], dim=1)
        out = model.qformer(query_embeds=embeds, query_length=q.shape[1], attention_mask=full_mask,
                            encoder_hidden_states=image_embeds,
                            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long))
        return model.itm_head(out.last_hidden_state[:, : q.shape[1]].float()).mean(1)[:, 1]

    @torch.no_grad()
    def step():
        with _autocast(precision):
            enc = tokenizer(texts, padding="longest", truncation=True, max_length=35, return_tensors="pt")
            text_feats = []
            for i in range(0, n_txt, 256):
                ids, mask = enc.input_ids[i : i + 256], enc.attention_mask[i : i + 256]
                hidden = model.qformer(query_embeds=model.embeddings(input_ids=ids), query_length=0,
                                       attention_mask=mask).last_hidden_state
                text_feats.append(torch.nn.functional.normalize(model.text_projection(hidden[:, 0].float()), dim=-1))
            text_feat = torch.cat(text_feats)
            image_embeds, image_feats = [], []
            for i in range(0, n_img, batch):
                emb = model.vision_model(pixel_values=images[i : i + batch]).last_hidden_state
                q = model.query_tokens.expand(emb.shape[0], -1, -1)
                out = model.qformer(query_embeds=q, encoder_hidden_states=emb,
                                    encoder_attention_mask=torch.ones(emb.shape[:2], dtype=torch.long))
                image_feats.append(torch.nn.functional.normalize(model.vision_projection(out.last_hidden_state.float()), dim=-1))
                image_embeds.append(emb)
            image_embeds = torch.cat(image_embeds)
            image_feat = torch.cat(image_feats)  # [I, Q, E]
            sims = torch.einsum("iqe,te->iqt", image_feat, text_feat).amax(1)  # [I, T]
            i2t = torch.full_like(sims, -100.0)
            for i in range(n_img):
                top, idx = sims[i].topk(k)
                i2t[i, idx] = itm(image_embeds[i].unsqueeze(0).expand(k, -1, -1), enc.input_ids[idx],
                                  enc.attention_mask[idx]).float() + top
            t2i = torch.full_like(sims.t(), -100.0)
            for t in range(n_txt):
                top, idx = sims[:, t].topk(k)
                t2i[t, idx] = itm(image_embeds[idx], enc.input_ids[t].expand(k, -1),
                                  enc.attention_mask[t].expand(k, -1)).float() + top
        return i2t.shape, t2i.shape

    return step
