"""Stage-1 BLIP-2 (blip2 / blip2_feature_extractor / blip2_image_text_matching) on the tiny zoo type."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import registry
from models.blip2_base import Blip2Base
from models.blip2_qformer import Blip2ITM, Blip2Qformer

TEXTS = ["a red circle", "a blue square to the left of a green star", "two small shapes", "a photo of a cat"]


def _tiny_cfg(**overrides):
    cfg = Blip2Qformer.load_zoo_config("tiny")
    return OmegaConf.merge(cfg, OmegaConf.create(overrides)) if overrides else cfg


@pytest.fixture(scope="module")
def tiny_model() -> Blip2Qformer:
    torch.manual_seed(0)
    return Blip2Qformer.from_config(_tiny_cfg())


@pytest.fixture
def model(tiny_model) -> Blip2Qformer:
    return copy.deepcopy(tiny_model)


def _samples(batch: int = 4, image_id=None):
    g = torch.Generator().manual_seed(5)
    samples = {"image": torch.randn(batch, 3, 64, 64, generator=g), "text_input": TEXTS[:batch]}
    if image_id is not None:
        samples["image_id"] = torch.tensor(image_id)
    return samples


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for name, m in model.named_modules():
        if hasattr(m, "dropout_p"):
            m.dropout_p = 0.0


def test_registered_names_and_zoo_yamls():
    assert registry.models.get("blip2") is Blip2Qformer
    assert registry.models.get("blip2_feature_extractor") is Blip2Qformer
    assert registry.models.get("blip2_image_text_matching") is Blip2ITM
    valid = Blip2Qformer.config_keys()
    for model_type in ("pretrain", "pretrain_vitL", "coco", "tiny"):
        cfg = OmegaConf.load(Blip2Qformer.default_config_path(model_type))
        assert set(cfg.model) <= valid, set(cfg.model) - valid
        assert {"vis_processor", "text_processor"} <= set(cfg.preprocess)
    coco = Blip2Qformer.load_zoo_config("coco")
    assert coco.image_size == 364 and coco.freeze_vit is False and coco.hf_hub_id == "Salesforce/blip2-itm-vit-g-coco"
    assert Blip2Qformer.load_zoo_config("pretrain").hf_hub_id == "Salesforce/blip2-itm-vit-g"
    with pytest.raises(KeyError, match="pretrain_vitL"):
        Blip2Qformer.default_config_path("pretrain_vitg")


def test_weight_plan_never_downloads_what_a_checkpoint_overwrites():
    pre = Blip2Qformer.load_zoo_config("pretrain")
    plan = Blip2Base.weight_plan(pre)
    assert plan["checkpoints"] == ["Salesforce/blip2-itm-vit-g"] and plan["vit_pretrained"] is None
    assert plan["bert"] is None
    lavis = Blip2Base.weight_plan(OmegaConf.merge(pre, {"weights": "lavis"}))
    assert lavis["checkpoints"][0].endswith("blip2_pretrained.pth") and lavis["vit_pretrained"].endswith("eva_vit_g.pth")
    assert lavis["bert"] is None
    scratch = Blip2Base.weight_plan(OmegaConf.merge(pre, {"weights": "lavis", "load_pretrained": False}))
    assert scratch["checkpoints"] == [] and scratch["bert"] == "bert-base-uncased"
    coco = Blip2Base.weight_plan(OmegaConf.merge(Blip2Qformer.load_zoo_config("coco"), {"weights": "lavis"}))
    assert coco["checkpoints"][0].endswith("blip2_finetune_coco.pth") and coco["vit_pretrained"] is None
    with pytest.raises(ValueError, match="weights"):
        Blip2Base.weight_plan({"weights": "hub"})


@pytest.mark.slow
def test_losses_finite_and_decreasing_over_20_steps(model):
    samples = _samples(image_id=[1, 2, 1, 3])
    model.train()
    params = [p for group in model.get_optimizer_params(0.05) for p in group["params"]]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    history = []
    for _ in range(20):
        out = model(samples)
        assert set(out) == {"loss", "loss_itc", "loss_itm", "loss_itg"}
        assert all(torch.isfinite(v) for v in out.values())
        torch.testing.assert_close(out["loss"], out["loss_itc"] + out["loss_itm"] + out["loss_itg"])
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in out.items()})
    first, last = history[:3], history[-3:]
    for key in ("loss", "loss_itc", "loss_itg"):
        before, after = sum(h[key] for h in first) / 3, sum(h[key] for h in last) / 3
        assert after < before - 0.05, (key, before, after)
    assert sum(h["loss_itg"] for h in last) / 3 < 0.9 * sum(h["loss_itg"] for h in first) / 3


def test_frozen_parts(model):
    encoder = model.visual_encoder
    assert not any(p.requires_grad for p in encoder.parameters())
    model.train()
    assert not encoder.training and model.Qformer.training
    out = model(_samples())
    out["loss"].backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert model.ln_vision.weight.grad is not None and model.query_tokens.grad is not None
    groups = model.get_optimizer_params(0.05, 0.9)
    names = {n for g in groups for n in g["param_names"]}
    assert not any(n.startswith("visual_encoder.") for n in names)
    assert {"ln_vision.weight", "query_tokens", "temp", "itm_head.weight"} <= names
    assert not any(k.startswith("visual_encoder.") for k in model.trainable_state_dict())
    counts = model.parameter_counts()
    assert counts["total"] - counts["trainable"] == sum(p.numel() for p in encoder.parameters())


def test_optimizer_groups_decay_and_vit_layer_scale():
    torch.manual_seed(0)
    model = Blip2Qformer.from_config(_tiny_cfg(freeze_vit=False))
    assert model.visual_encoder.training is False or True  # trainable ViT follows .train()
    model.train()
    assert model.visual_encoder.training
    groups = model.get_optimizer_params(0.05, 0.5)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["temp"]["weight_decay"] == 0.0 and by_name["ln_vision.weight"]["weight_decay"] == 0.0
    assert by_name["Qformer.bert.encoder.layer.0.attention.self.query.bias"]["weight_decay"] == 0.0
    assert by_name["Qformer.bert.encoder.layer.0.attention.self.query.weight"]["weight_decay"] == 0.05
    assert by_name["vision_proj.weight"]["lr_scale"] == 1.0
    depth = model.num_vision_layers()
    assert depth == 2
    assert by_name["visual_encoder.blocks.1.mlp.fc1.weight"]["lr_scale"] == pytest.approx(0.5 ** (depth + 1 - 2))
    assert by_name["visual_encoder.blocks.0.mlp.fc1.weight"]["lr_scale"] == pytest.approx(0.5 ** (depth + 1 - 1))
    assert by_name["visual_encoder.pos_embed"]["lr_scale"] == pytest.approx(0.5 ** (depth + 1))
    all_params = {id(p) for g in groups for p in g["params"]}
    assert all_params == {id(p) for p in model.parameters() if p.requires_grad}


def test_itc_soft_targets_for_duplicate_image_ids(model):
    model.eval()
    _no_dropout(model)
    samples = _samples(image_id=[7, 8, 7, 9])
    with torch.no_grad():
        out = model(samples)
        image_feats = model.extract_features(samples, mode="image").image_embeds_proj  # [B, Q, E]
        ids, atts = model.tokenize(samples["text_input"])
        text_feat = model.text_features(ids, atts)  # [B, E]
        sim = torch.einsum("bqe,te->btq", image_feats, text_feat).amax(-1) / model.temp  # [B, B]
        pos = (samples["image_id"][:, None] == samples["image_id"][None, :]).float()
        targets = pos / pos.sum(1, keepdim=True)
        targets = 0.9 * targets + 0.1 / 4
        expected = (-(F.log_softmax(sim, 1) * targets).sum(1).mean() - (F.log_softmax(sim.t(), 1) * targets).sum(1).mean()) / 2
    torch.testing.assert_close(out["loss_itc"], expected, rtol=1e-4, atol=1e-5)
    # without ids: the diagonal is the only positive
    with torch.no_grad():
        plain = model(_samples())["loss_itc"]
        eye = torch.eye(4) * 0.9 + 0.1 / 4
        expected_plain = (-(F.log_softmax(sim, 1) * eye).sum(1).mean() - (F.log_softmax(sim.t(), 1) * eye).sum(1).mean()) / 2
    torch.testing.assert_close(plain, expected_plain, rtol=1e-4, atol=1e-5)


def _lavis_itc_loss(model, samples):
    """LAVIS ``Blip2Qformer.forward``'s ITC written out, one process under torch.distributed: ``concat_all_gather``
    returns fresh tensors (no gradient), so the gathered side is ``.detach()``-ed."""
    image_embeds = model.encode_image(samples["image"])
    image_feats = F.normalize(model.vision_proj(model.query_features(image_embeds).last_hidden_state), dim=-1)
    ids, atts = model.tokenize(samples["text_input"])
    text_out = model.Qformer.bert(input_ids=ids, attention_mask=atts).last_hidden_state
    text_feat = F.normalize(model.text_proj(text_out[:, 0, :]), dim=-1)
    image_feats_all, text_feat_all = image_feats.detach(), text_feat.detach()  # concat_all_gather
    sim_q2t = torch.matmul(image_feats.unsqueeze(1), text_feat_all.unsqueeze(-1)).squeeze()
    sim_i2t = sim_q2t.max(-1)[0] / model.temp
    sim_t2q = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_feats_all.permute(0, 2, 1)).squeeze()
    sim_t2i = sim_t2q.max(-1)[0] / model.temp
    bs = image_feats.shape[0]
    if "image_id" in samples:
        image_ids = samples["image_id"].view(-1, 1)
        pos_idx = torch.eq(image_ids, image_ids.t()).float()
        sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
        sim_targets = 0.9 * sim_targets + 0.1 * torch.ones_like(sim_targets) / sim_targets.size(1)
        loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_targets, dim=1).mean()
        loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_targets, dim=1).mean()
        return (loss_t2i + loss_i2t) / 2
    targets = torch.linspace(0, bs - 1, bs, dtype=int)
    return (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2


def _grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("image_id", [None, [1, 2, 1, 3]])
def test_itc_gradient_equals_released_formula(image_id):
    """ITC alone: loss and every gradient equal LAVIS's formula (gathered features detached), rel. L2 <= 1e-3 over
    all gradients (1e-2 per tensor);
    ``itc_gather_grad: true`` keeps the loss value but changes the gradient."""
    torch.manual_seed(0)
    model = Blip2Qformer.from_config(_tiny_cfg(loss_weights={"itc": 1, "itm": 0, "itg": 0}))
    _no_dropout(model)
    model.train()
    samples = _samples(image_id=image_id)
    out = model(samples)
    assert set(out) == {"loss", "loss_itc"}
    ours = _grads(model, out["loss"])
    reference_loss = _lavis_itc_loss(model, samples)
    reference = _grads(model, reference_loss)
    torch.testing.assert_close(out["loss"].detach(), reference_loss.detach(), rtol=0, atol=1e-6)
    assert set(ours) == set(reference) and "text_proj.weight" in ours and "query_tokens" in ours
    # fp32: the two orders of summation differ by ~2e-4 overall and up to ~2e-3 on the smallest gradients
    # (text_proj.bias: the batch's terms nearly cancel); the gradient through the gathered side changes them by O(1).
    flat = lambda grads: torch.cat([grads[n].flatten() for n in sorted(reference)])  # noqa: E731
    assert _rel_l2(flat(ours), flat(reference)) <= 1e-3
    for name, grad in reference.items():
        if grad.norm() < 1e-9:  # zero up to rounding (attention key biases: softmax-invariant)
            assert ours[name].norm() < 1e-9, name
        else:
            assert _rel_l2(ours[name], grad) <= 1e-2, (name, _rel_l2(ours[name], grad))
    model.itc_gather_grad = True
    with_grad = model(samples)["loss"]
    torch.testing.assert_close(with_grad.detach(), reference_loss.detach(), rtol=0, atol=1e-6)
    other = _grads(model, with_grad)
    assert _rel_l2(other["text_proj.weight"], reference["text_proj.weight"]) > 1.0
    assert _rel_l2(flat(other), flat(reference)) > 0.5


def test_loss_weights_switch_and_scale_objectives(model):
    _no_dropout(model)
    model.train()
    samples = dict(_samples(), iters=3)
    full = model(samples)
    model.loss_weights = Blip2Qformer._check_loss_weights({"itg": 0})
    model._step = 0
    no_itg = model(dict(samples))
    assert "loss_itg" not in no_itg
    torch.testing.assert_close(no_itg["loss_itc"], full["loss_itc"])
    torch.testing.assert_close(no_itg["loss_itm"], full["loss_itm"])  # same seeded negatives
    torch.testing.assert_close(no_itg["loss"], full["loss_itc"] + full["loss_itm"])
    model.loss_weights = Blip2Qformer._check_loss_weights({"itc": 2, "itm": 1, "itg": 0.5})
    scaled = model(dict(samples))
    torch.testing.assert_close(scaled["loss"], 2 * full["loss_itc"] + full["loss_itm"] + 0.5 * full["loss_itg"])
    for bad, match in [({"itx": 1}, "unknown objective"), ({"itc": -1}, ">= 0"), ({"itc": "1"}, ">= 0"),
                       ({"itc": 0, "itm": 0, "itg": 0}, "at least one")]:
        with pytest.raises(ValueError, match=match):
            Blip2Qformer.from_config(_tiny_cfg(loss_weights=bad))


def test_temperature_is_clamped(model):
    with torch.no_grad():
        model.temp.fill_(3.0)
    model(_samples())
    assert model.temp.item() == pytest.approx(0.5)


def test_itm_negatives_hardest_and_multinomial_determinism(model):
    g = torch.Generator().manual_seed(0)
    sim_i2t, sim_t2i = torch.randn(4, 4, generator=g) * 5, torch.randn(4, 4, generator=g) * 5
    positives = torch.eye(4, dtype=torch.bool)
    model.itm_negatives = "hardest"
    img, txt = model._itm_negatives(sim_i2t, sim_t2i, positives, {}, rank=0, batch=4)
    assert torch.equal(img, sim_t2i.masked_fill(positives, -1e4).argmax(1))
    assert torch.equal(txt, sim_i2t.masked_fill(positives, -1e4).argmax(1))
    model.itm_negatives = "multinomial"
    a = model._itm_negatives(sim_i2t, sim_t2i, positives, {"iters": 3}, rank=0, batch=4)
    b = model._itm_negatives(sim_i2t, sim_t2i, positives, {"iters": 3}, rank=0, batch=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (a[0] == torch.arange(4)).any() and not (a[1] == torch.arange(4)).any()  # never the positive
    # the same global sample draws the same negative whatever the rank layout (2 ranks x 2 == 1 rank x 4)
    rank1 = model._itm_negatives(sim_i2t[2:], sim_t2i[2:], positives[2:], {"iters": 3}, rank=1, batch=2)
    assert torch.equal(rank1[0], a[0][2:]) and torch.equal(rank1[1], a[1][2:])
    # other steps draw other negatives (over many samples, some differ)
    big_sim = torch.zeros(64, 64)
    big_pos = torch.eye(64, dtype=torch.bool)
    s3 = model._itm_negatives(big_sim, big_sim, big_pos, {"iters": 3}, rank=0, batch=64)[0]
    s4 = model._itm_negatives(big_sim, big_sim, big_pos, {"iters": 4}, rank=0, batch=64)[0]
    assert (s3 != s4).any()


def test_generate_shapes_and_incremental_decoding(model):
    model.eval()
    samples = _samples(batch=2)
    beams = model.generate(samples, num_beams=3, max_length=8, min_length=3, num_captions=2)
    assert len(beams) == 4 and all(isinstance(c, str) for c in beams)
    sampled = model.generate(samples, use_nucleus_sampling=True, max_length=6, num_captions=3, top_p=0.9)
    assert len(sampled) == 6
    # greedy decoding on the KV cache equals argmax decoding by full recompute
    greedy = model.generate(samples, num_beams=1, max_length=6, min_length=1)
    tok = model.tokenizer
    with torch.no_grad():
        image_embeds = model.encode_image(samples["image"])
        queries = model.query_tokens.expand(2, -1, -1)
        ids = torch.full((2, 1), tok.bos_token_id)
        for _ in range(5):
            atts = torch.ones(2, queries.shape[1] + ids.shape[1], dtype=torch.long)
            logits = model.Qformer(ids, atts, query_embeds=queries, encoder_hidden_states=image_embeds).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    expected = []
    for row in ids.tolist():
        row = row[: row.index(tok.sep_token_id) + 1] if tok.sep_token_id in row else row
        expected.append(tok.decode(row, skip_special_tokens=True).strip())
    assert greedy == expected
    with pytest.raises(ValueError, match="num_captions"):
        model.generate(samples, num_beams=2, num_captions=3)


def test_beam_search_min_length_and_repetition_penalty():
    from models.qformer_config import QFormerCache
    from models.qformer_decoding import beam_search, sample

    vocab, eos = 6, 2
    cache = QFormerCache([(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))], num_query=1)

    def step(last, past):  # eos is always the most likely token; token 3 next
        logits = torch.tensor([[0.0, 0.0, 5.0, 4.0, 1.0, 0.0]]).repeat(last.shape[0], 1)
        return logits, past.map(lambda t: torch.cat([t, t[:, :, :1]], 2))

    ids = beam_search(step, cache, bos_id=1, eos_id=eos, pad_id=0, num_beams=2, max_length=8, min_length=4)
    row = ids[0].tolist()
    assert row.index(eos) == 4  # eos only once 4 tokens (bos included) exist
    greedy = sample(step, cache, 1, eos, 0, max_length=8, min_length=5, greedy=True, repetition_penalty=1.0)
    assert greedy[0].tolist() == [1, 3, 3, 3, 3, 2]
    penalised = sample(step, cache, 1, eos, 0, max_length=8, min_length=5, greedy=True, repetition_penalty=10.0)
    assert penalised[0].tolist()[:3] == [1, 3, 4]  # token 3 is penalised after its first use


def test_extract_features_and_itm_model(model):
    model.eval()
    samples = _samples()
    image = model.extract_features(samples, mode="image")
    text = model.extract_features(samples, mode="text")
    multi = model.extract_features(samples, mode="multimodal")
    assert image.image_embeds.shape == (4, 8, 64) and image.image_embeds_proj.shape == (4, 8, 32)
    torch.testing.assert_close(image.image_embeds_proj.norm(dim=-1), torch.ones(4, 8))
    longest = max(len(model.tokenizer(t).input_ids) for t in TEXTS)
    assert text.text_embeds.shape == (4, longest, 64)  # padded to the longest text only
    assert multi.multimodal_embeds.shape == (4, 8, 64) and image.text_embeds is None
    with pytest.raises(ValueError, match="mode"):
        model.extract_features(samples, mode="video")

    itm_model = Blip2ITM.from_config(_tiny_cfg())
    itm_model.load_state_dict(model.state_dict())
    itm_model.eval()
    with torch.no_grad():
        itm = itm_model(samples, match_head="itm")
        itc = itm_model(samples, match_head="itc")
    assert itm.shape == (4, 2) and itc.shape == (4, 1)
    expected_itc = (image.image_embeds_proj @ text.text_embeds_proj[:, 0].unsqueeze(-1)).amax(1)
    torch.testing.assert_close(itc, expected_itc, rtol=1e-5, atol=1e-5)
    # retrieval API: compute_itm / itm_scores equal the ITM head's "match" logit
    feats, embeds = model.image_retrieval_features(samples["image"])
    text_feat, ids, atts = model.text_retrieval_features(TEXTS)
    torch.testing.assert_close(feats, image.image_embeds_proj)
    torch.testing.assert_close(text_feat, text.text_embeds_proj[:, 0])
    with torch.no_grad():
        direct = itm_model.itm_head(
            itm_model.query_features(embeds, ids, atts).last_hidden_state[:, :8]
        )[:, :, 1].mean(1)
    torch.testing.assert_close(model.itm_scores(embeds, ids, atts), direct, rtol=1e-5, atol=1e-5)
    # distinct images + an index: the same scores with each image's K/V projected once
    index = torch.tensor([2, 2, 0, 2])
    torch.testing.assert_close(model.itm_scores(embeds, ids, atts, image_index=index),
                               model.itm_scores(embeds[index], ids, atts), rtol=1e-5, atol=1e-5)


def test_cached_image_embeds_hook(model):
    model.eval()
    samples = _samples()
    with torch.no_grad():
        raw = model.frozen_image_features(samples["image"])  # what a feature cache stores
        direct = model.extract_features(samples, mode="image").image_embeds
        cached = model.extract_features({"image_embeds": raw, "text_input": TEXTS}, mode="image").image_embeds
    torch.testing.assert_close(cached, direct)
    model.vit_frozen = False
    with pytest.raises(ValueError, match="freeze_vit"):
        model.image_embeds_from_samples({"image_embeds": raw})


def test_lavis_state_dict_round_trip(model, tmp_path):
    state = model.trainable_state_dict()
    for key in ["query_tokens", "ln_vision.weight", "vision_proj.weight", "text_proj.bias", "itm_head.weight", "temp",
                "Qformer.bert.embeddings.word_embeddings.weight", "Qformer.bert.embeddings.position_ids",
                "Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
                "Qformer.bert.encoder.layer.1.output_query.LayerNorm.weight", "Qformer.cls.predictions.bias",
                "Qformer.cls.predictions.transform.dense.weight"]:
        assert key in state, key
    path = tmp_path / "blip2_stage1.pth"
    torch.save({"model": state}, path)  # the LAVIS layout: trainable parts only under "model"
    torch.manual_seed(123)
    fresh = Blip2Qformer.from_config(_tiny_cfg())
    fresh.visual_encoder.load_state_dict(model.visual_encoder.state_dict())  # the frozen ViT comes separately
    fresh.load_checkpoint(str(path))
    fresh.eval(), model.eval()
    samples = _samples()
    with torch.no_grad():
        torch.testing.assert_close(fresh.extract_features(samples, "multimodal").multimodal_embeds,
                                   model.extract_features(samples, "multimodal").multimodal_embeds)
    assert fresh.Qformer.cls.predictions.decoder.weight is fresh.Qformer.bert.embeddings.word_embeddings.weight
    # a checkpoint missing a trainable part is an error
    del state["itm_head.weight"]
    torch.save({"model": state}, path)
    with pytest.raises(KeyError, match="itm_head.weight"):
        fresh.load_checkpoint(str(path))


def test_vit_fp16_falls_back_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("fp16 is kept on CUDA machines")
    model = Blip2Qformer.from_config(_tiny_cfg(vit_precision="fp16"))
    assert next(model.visual_encoder.parameters()).dtype == torch.float32  # common.precision: fp16 off CUDA -> fp32
    model.visual_encoder.half()  # fp16 weights that reached the CPU are upcast before they compute
    out = model.encode_image(torch.randn(1, 3, 64, 64))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="vit_precision"):
        Blip2Qformer.from_config(_tiny_cfg(vit_precision="int8"))


def test_question_conditioned_query_pass(model):
    """Stage-2 models may feed the question to the Q-Former with the queries (bidirectional)."""
    ids, atts = model.tokenize(["what color is the circle?", "how many shapes?"])
    embeds = model.encode_image(_samples(batch=2)["image"])
    out = model.query_features(embeds, ids, atts).last_hidden_state
    assert out.shape == (2, 8 + ids.shape[1], 64)
    alone = model.query_features(embeds).last_hidden_state
    assert (out[:, :8] - alone).abs().max() > 1e-4  # the queries saw the question


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = Blip2Qformer.from_config(_tiny_cfg())
        _no_dropout(model)
        model.train()
        samples = _samples(image_id=[1, 2, 1, 3])
        per_rank = 4 // world
        local = {"image": samples["image"][rank * per_rank:(rank + 1) * per_rank],
                 "text_input": samples["text_input"][rank * per_rank:(rank + 1) * per_rank],
                 "image_id": samples["image_id"][rank * per_rank:(rank + 1) * per_rank], "iters": 7}
        model(local)["loss"].backward()
        grads = {}
        for name, p in model.named_parameters():
            if p.grad is not None:
                tdist.all_reduce(p.grad)  # what DDP does: average over ranks
                grads[name] = p.grad / world
        if rank == 0:
            torch.save(grads, f"{out_dir}/grads.pt")
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_give_the_single_process_gradients(tmp_path):
    """ITC/ITM/ITG across 2 gloo ranks x 2 samples == 1 process x 4 samples (gathers with gradient, negatives
    seeded per global sample, ITG normalised by the global token count)."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    model = Blip2Qformer.from_config(_tiny_cfg())
    _no_dropout(model)
    model.train()
    samples = dict(_samples(image_id=[1, 2, 1, 3]), iters=7)
    model(samples)["loss"].backward()
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    grads = torch.load(tmp_path / "grads.pt", weights_only=True)
    reference = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(reference)
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {grads[name]} vs {grad}: {m}")


def test_itm_reuses_image_key_values_exactly(model):
    """The ITM pass on reused image K/V equals the pass that projects the image embeds again."""
    model.eval()
    samples = _samples()
    with torch.no_grad():
        embeds = model.encode_image(samples["image"])
        first = model.query_features(embeds)
        ids, atts = model.tokenize(TEXTS)
        index = torch.tensor([0, 3, 3, 1])
        reused = model.query_features(None, ids, atts,
                                      image_key_values=model.select_image_key_values(first.image_key_values, index))
        direct = model.query_features(embeds[index], ids, atts)
    torch.testing.assert_close(reused.last_hidden_state, direct.last_hidden_state, rtol=1e-5, atol=1e-5)
