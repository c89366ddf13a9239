"""Stage-2 BLIP-2 models (blip2_opt, blip2_t5) on the offline tiny types."""
from __future__ import annotations

import json

import pytest
import torch

import registry
from models.blip2_opt import Blip2OPT
from models.blip2_t5 import Blip2T5

QUESTION_PROMPT = "question: {} answer:"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: thread sync costs more than it saves on a shared 2-core box
    yield
    torch.set_num_threads(threads)


def build(cls, seed=0, **overrides):
    torch.manual_seed(seed)
    return cls.from_pretrained("tiny", **overrides)


def images(n=2, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def opt_model():
    return build(Blip2OPT).eval()


@pytest.fixture(scope="module")
def t5_model():
    return build(Blip2T5).eval()


def train(model, samples, steps, lr=3e-3):
    optimizer = torch.optim.AdamW([p for g in model.get_optimizer_params(0.0) for p in g["params"]], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(samples)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def test_registered_and_zoo_types():
    assert registry.models.get("blip2_opt") is Blip2OPT and registry.models.get("blip2_t5") is Blip2T5
    assert set(Blip2OPT.PRETRAINED_MODEL_CONFIG_DICT) == {
        "pretrain_opt2.7b", "pretrain_opt6.7b", "caption_coco_opt2.7b", "caption_coco_opt6.7b", "tiny"}
    assert set(Blip2T5.PRETRAINED_MODEL_CONFIG_DICT) == {
        "pretrain_flant5xl", "pretrain_flant5xl_vitL", "pretrain_flant5xxl", "caption_coco_flant5xl", "tiny"}
    expected = {"caption_coco_opt2.7b": ("Salesforce/blip2-opt-2.7b-coco", "facebook/opt-2.7b", 364, "a photo of"),
                "pretrain_flant5xxl": ("Salesforce/blip2-flan-t5-xxl", "google/flan-t5-xxl", 224, "")}
    for model_type, (hub, llm, size, prompt) in expected.items():
        cls = Blip2OPT if "opt" in model_type else Blip2T5
        cfg = cls.load_zoo_config(model_type)
        assert cfg.hf_hub_id == hub and cfg.get("opt_model", cfg.get("t5_model")) == llm
        assert cfg.image_size == size and cfg.prompt == prompt and cfg.pretrained.endswith(".pth")
        assert set(cfg) <= cls.config_keys(), set(cfg) - cls.config_keys()


@pytest.mark.parametrize("cls", [Blip2OPT, Blip2T5])
def test_frozen_parts(cls, opt_model, t5_model):
    model = opt_model if cls is Blip2OPT else t5_model
    llm = model.llm
    assert llm is getattr(model, cls.LLM_ATTR) and isinstance(model.llm_proj, torch.nn.Linear)
    model.train()
    assert not llm.training and not llm.model.training and not model.visual_encoder.training
    assert model.Qformer.training
    optimizer_names = {n for g in model.get_optimizer_params(0.05) for n in g["param_names"]}
    assert optimizer_names and not any(n.startswith((cls.LLM_ATTR, "visual_encoder")) for n in optimizer_names)
    assert not any(k.startswith((cls.LLM_ATTR, "visual_encoder")) for k in model.trainable_state_dict())
    assert f"{cls.PROJ_ATTR}.weight" in model.trainable_state_dict()
    assert model.Qformer.bert.embeddings.word_embeddings is None  # stage 2: query path only
    model.eval()


@pytest.mark.parametrize("cls", [Blip2OPT, Blip2T5])
def test_loss_finite_and_decreasing(cls):
    model = build(cls)
    samples = {"image": images(), "text_input": ["a red circle left of a blue square", "two green stars"]}
    losses = train(model, samples, steps=15)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses


def test_opt_prompt_tokens_masked(opt_model):
    model = opt_model
    model.prompt = "a photo of"
    try:
        soft = torch.zeros(2, 8, model.llm.hidden_size)
        texts = ["a photo of a red circle", "a photo of two cats on a couch"]
        inputs = model.caption_inputs(soft, texts)
        labels = inputs["labels"]
        n_prompt = len(model.llm.tokenizer("a photo of").input_ids)  # BOS included
        tok = model.llm.tokenizer
        for i, text in enumerate(texts):
            ids = tok(text).input_ids + [model.llm.newline_token_id]
            assert (labels[i, : 8 + n_prompt] == -100).all()
            assert labels[i, 8 + n_prompt : 8 + len(ids)].tolist() == ids[n_prompt:]
            assert (labels[i, 8 + len(ids) :] == -100).all()  # right padding, only to the longest
        assert labels.shape[1] == 8 + len(tok(texts[1]).input_ids) + 1
        assert inputs["attention_mask"].sum(1).tolist() == [8 + len(tok(t).input_ids) + 1 for t in texts]
    finally:
        model.prompt = ""


def test_opt_empty_prompt_scores_bos_unless_mask_bos(opt_model):
    """No prompt: the caption's BOS is a target (LAVIS, transformers); ``mask_bos: true`` leaves it out."""
    soft = torch.zeros(1, 8, opt_model.llm.hidden_size)
    tok = opt_model.llm.tokenizer
    ids = tok("a red circle").input_ids + [opt_model.llm.newline_token_id]
    assert ids[0] == tok.bos_token_id
    assert opt_model.caption_inputs(soft, ["a red circle"])["labels"][0, 8:].tolist() == ids
    masked = build(Blip2OPT, mask_bos=True)
    assert masked.mask_bos is True
    assert masked.caption_inputs(soft, ["a red circle"])["labels"][0, 8:].tolist() == [-100] + ids[1:]
    with pytest.raises(ValueError, match="mask_bos"):
        build(Blip2OPT, mask_bos="yes")


def test_t5_prefix_split_and_text_output(t5_model):
    model = t5_model
    model.prompt = "a photo of"
    try:
        assert model.split_caption("a photo of a red circle") == ("a photo of", "a red circle")
        assert model.split_caption("two cats") == ("", "two cats")
    finally:
        model.prompt = ""
    soft = torch.zeros(2, 8, model.llm.hidden_size)
    inputs = model.lm_inputs(soft, ["what color?", "how many shapes are there?"], ["red", "two"])
    tok = model.llm.tokenizer
    assert inputs["labels"][0].tolist()[: len(tok("red").input_ids)] == tok("red").input_ids
    assert inputs["attention_mask"].shape[1] == 8 + len(tok("how many shapes are there?").input_ids)


def test_flan_t5_computes_with_lavis_gelu(t5_model, tmp_path):
    """Built from an LLM name whose config says gelu_new (as the hub's flan-t5 ones), the T5 uses exact GELU, as
    LAVIS's blip2_t5.py builds it: the logits after loading a LAVIS-layout checkpoint equal transformers' T5 built
    the LAVIS way (config.dense_act_fn = "gelu"), 1e-5; ``llm_kwargs.dense_act_fn: null`` keeps gelu_new."""
    from transformers import T5Config, T5ForConditionalGeneration

    path = t5_model.llm.model_name_or_path
    assert T5Config.from_pretrained(path).dense_act_fn == "gelu_new"
    trained = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
               for k, v in t5_model.trainable_state_dict().items()}
    torch.save({"model": trained}, tmp_path / "blip2_lavis.pth")  # LAVIS layout: query_tokens, Qformer.*, t5_proj.*
    model = build(Blip2T5, seed=1).eval()
    model.load_checkpoint(str(tmp_path / "blip2_lavis.pth"))
    samples = {"image": images(2), "text_input": ["question: what is it?", "a photo of"],
               "text_output": ["a red circle", "two squares"]}

    def reference_logits(act):
        config = T5Config.from_pretrained(path)
        if act:
            config.dense_act_fn = act  # LAVIS: t5_config.dense_act_fn = "gelu"
        t5 = T5ForConditionalGeneration.from_pretrained(path, config=config).eval()
        with torch.no_grad():
            inputs = model.lm_inputs(model.soft_prompt(samples, None), samples["text_input"], samples["text_output"])
            return t5(**inputs).logits, inputs["decoder_attention_mask"].bool()

    with torch.no_grad():
        got = model(samples, return_logits=True)["logits"]
    expected, valid = reference_logits("gelu")
    assert model.llm.model.config.dense_act_fn == "gelu"
    torch.testing.assert_close(got[valid], expected[valid], rtol=0, atol=1e-5)
    old, _ = reference_logits(None)
    assert (old[valid] - expected[valid]).abs().max() > 1e-4  # gelu_new really is another function here
    keep = build(Blip2T5, llm_kwargs={"dense_act_fn": None})
    assert keep.llm.model.config.dense_act_fn == "gelu_new"


@pytest.mark.parametrize("cls", [Blip2OPT, Blip2T5])
def test_generate_beams_captions_and_per_image_prompts(cls, opt_model, t5_model):
    model = opt_model if cls is Blip2OPT else t5_model
    img = images(3)
    captions = model.generate({"image": img}, num_beams=3, max_length=6, num_captions=2)
    assert len(captions) == 6 and all(isinstance(c, str) for c in captions)
    sampled = model.generate({"image": img}, use_nucleus_sampling=True, num_beams=1, max_length=4, num_captions=3)
    assert len(sampled) == 9
    # one prompt per image (different lengths -> padding) == each image generated alone
    prompts = ["a photo of", "question: what color is the big square? answer:", ""]
    batched = model.generate({"image": img, "prompt": prompts}, num_beams=1, max_length=6)
    alone = [model.generate({"image": img[i : i + 1], "prompt": prompts[i]}, num_beams=1, max_length=6)[0]
             for i in range(3)]
    assert batched == alone
    with pytest.raises(ValueError, match="one per image"):
        model.generate({"image": img, "prompt": ["a", "b"]})


def test_generate_matches_llm_greedy(opt_model):
    """Greedy captions are exactly the LLM's greedy continuation of [soft prompt; BOS]."""
    model, img = opt_model, images(2)
    with torch.no_grad():
        soft = model.soft_prompt({"image": img})
        embeds, atts = model.generation_inputs(soft, ["", ""])
        ids = model.llm.model.generate(inputs_embeds=embeds, attention_mask=atts, max_new_tokens=5, num_beams=1,
                                       do_sample=False, eos_token_id=model.llm.eos_token_ids,
                                       pad_token_id=model.llm.pad_token_id)
    assert model.generate({"image": img}, num_beams=1, max_length=5) == model.llm.decode(ids)
    assert atts[:, -1].tolist() == [1, 1] and embeds.shape[1] == 8 + 1  # queries + BOS


@pytest.mark.parametrize("cls", [Blip2OPT, Blip2T5])
def test_predict_answers_generate_and_rank_consistency(cls, opt_model, t5_model):
    model = opt_model if cls is Blip2OPT else t5_model
    samples = {"image": images(2), "text_input": ["what color is it?", "how many?"]}
    answers = model.predict_answers(samples, num_beams=2, max_len=3, prompt=QUESTION_PROMPT)
    assert len(answers) == 2
    candidates = ["red", "blue", "two", "a red circle", "yes"]
    best = model.predict_answers(samples, inference_method="rank", answer_list=candidates, num_ans_candidates=5,
                                 prompt=QUESTION_PROMPT, length_penalty=0)
    # rank == argmax of the full answer log-likelihood, computed independently per candidate
    with torch.no_grad():
        soft = model.soft_prompt(samples)
        for i, question in enumerate(samples["text_input"]):
            prompt = QUESTION_PROMPT.format(question)
            nll = [float(model.llm(**model.lm_inputs(soft[i : i + 1], [prompt], [c])).nll) for c in candidates]
            assert best[i] == candidates[min(range(len(nll)), key=nll.__getitem__)]
    # num_ans_candidates=1: the candidate with the most likely first token
    first = model.predict_answers(samples, inference_method="rank", answer_list=candidates, num_ans_candidates=1,
                                  prompt=QUESTION_PROMPT)
    with torch.no_grad():
        logp = model.first_token_log_probs(soft, [QUESTION_PROMPT.format(q) for q in samples["text_input"]])
    for i, q in enumerate(samples["text_input"]):
        firsts = [ids[0] for ids in model.target_ids(QUESTION_PROMPT.format(q), candidates)]
        assert first[i] == candidates[max(range(len(candidates)), key=lambda j: float(logp[i, firsts[j]]))]
    with pytest.raises(ValueError, match="answer_list"):
        model.predict_answers(samples, inference_method="rank")
    with pytest.raises(ValueError, match="inference_method"):
        model.predict_answers(samples, inference_method="vote")
    with pytest.raises(ValueError, match="placeholder"):
        model.predict_answers(samples, prompt="Answer:")


@pytest.mark.parametrize("cls, expected", [(Blip2OPT, 0.0), (Blip2T5, -1.0)])
def test_predict_answers_length_penalty_defaults_to_lavis(cls, expected, opt_model, t5_model, monkeypatch):
    """Without a length_penalty, beam search gets LAVIS's per-family default (blip2_opt.py 0, blip2_t5.py -1);
    an explicit value wins."""
    model = opt_model if cls is Blip2OPT else t5_model
    seen = []
    real = model.llm.generate
    monkeypatch.setattr(model.llm, "generate", lambda *a, **kw: seen.append(kw["length_penalty"]) or real(*a, **kw))
    samples = {"image": images(1), "text_input": ["what color is it?"]}
    model.predict_answers(samples, num_beams=2, max_len=2, prompt=QUESTION_PROMPT)
    model.predict_answers(samples, num_beams=2, max_len=2, prompt=QUESTION_PROMPT, length_penalty=0.5)
    assert seen == [expected, 0.5]


def test_rank_shared_prefix_scores_equal_full_forwards(opt_model):
    """Decoder-only ranking runs [soft prompt; prompt] once and the candidates against its KV cache: each candidate's
    summed NLL and token count equal those of the full [soft; prompt; candidate] forward (fp32, 1e-4)."""
    model = opt_model
    samples = {"image": images(1), "text_input": ["what color is it?"]}
    candidates = ["red", "a red circle", "two blue squares here", "yes"]  # 1 to 4 words: right padding is used
    with torch.no_grad():
        soft = model.soft_prompt(samples)
        prompt = QUESTION_PROMPT.format(samples["text_input"][0])
        full = model.llm(**model.lm_inputs(soft.expand(len(candidates), -1, -1), [prompt] * len(candidates),
                                           candidates), return_logits=False)
        embeds, atts = model.generation_inputs(soft, [prompt])
        first, cache = model.llm.prefix_state(embeds, atts)
        nll, count = model.llm.continuation_nll(first, cache, atts, model.target_ids(prompt, candidates))
    assert count.tolist() == full.num_tokens.tolist()
    torch.testing.assert_close(nll, full.nll, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", [Blip2OPT, Blip2T5])
def test_rank_picks_planted_answer(cls):
    """Teach each image its answer; ranking must then pick it among distractors (generate too)."""
    model = build(cls, prompt=QUESTION_PROMPT)
    img = images(2, seed=1)
    questions = ["what is it?", "what is it?"]
    train(model, {"image": img, "text_input": questions, "text_output": ["blue star", "red circle"]}, steps=40)
    candidates = ["red circle", "blue circle", "blue star", "red star", "two", "yes"]
    samples = {"image": img, "text_input": questions}
    assert model.predict_answers(samples, inference_method="rank", answer_list=candidates,
                                 num_ans_candidates=6, length_penalty=0) == ["blue star", "red circle"]
    assert model.predict_answers(samples, inference_method="rank", answer_list=candidates[::-1],
                                 num_ans_candidates=3) == ["blue star", "red circle"]


def test_weighted_answers_loss(opt_model):
    model = opt_model
    samples = {"image": images(2), "text_input": ["what color?", "how many?"],
               "answers": [["red", "blue"], ["two"]], "weights": [[0.75, 0.25], [1.0]]}
    with torch.no_grad():
        loss = model(samples)["loss"]
        soft = model.soft_prompt(samples)
        nll = lambda i, a: float(model.llm(**model.lm_inputs(soft[i : i + 1], [samples["text_input"][i]], [a])).nll)
        expected = (0.75 * nll(0, "red") + 0.25 * nll(0, "blue") + nll(1, "two")) / 2
    assert abs(float(loss) - expected) < 1e-4


@pytest.mark.parametrize("cls", [Blip2OPT, Blip2T5])
def test_question_conditioned_qformer(cls):
    plain = build(cls).eval()
    conditioned = build(cls, qformer_text_input=True).eval()
    assert plain.Qformer.bert.embeddings.word_embeddings is None
    assert conditioned.Qformer.bert.embeddings.word_embeddings is not None  # text path kept
    assert conditioned.Qformer.bert.encoder.layer[0].intermediate is not None
    img = images(2)
    with torch.no_grad():
        a = conditioned.soft_prompt({"image": img}, ["what color is it?", "what color is it?"])
        b = conditioned.soft_prompt({"image": img}, ["how many shapes?", "what color is it?"])
        assert a.shape == (2, 8, conditioned.llm.hidden_size)
        assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-5)
        c = plain.soft_prompt({"image": img}, ["anything", "else"])
        assert torch.equal(c, plain.soft_prompt({"image": img}))
    samples = {"image": img, "text_input": ["what color?", "how many?"], "text_output": ["red", "two"]}
    losses = train(conditioned, samples, steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    grads_seen = conditioned.Qformer.bert.embeddings.word_embeddings.weight.requires_grad
    assert grads_seen and "Qformer.bert.embeddings.word_embeddings.weight" in conditioned.trainable_state_dict()
    assert len(conditioned.predict_answers({"image": img, "text_input": ["what color?", "how many?"]},
                                           max_len=3, num_beams=1)) == 2


def test_trainable_checkpoint_round_trip(opt_model, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in opt_model.trainable_state_dict().items()}
    save_file(state, tmp_path / "ckpt.safetensors")
    other = build(Blip2OPT, seed=0).eval()  # same frozen ViT/LLM (not in checkpoints); new trainable parts:
    with torch.no_grad():
        for name, param in other.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    samples = {"image": images(2), "text_input": ["a red circle", "two"]}
    with torch.no_grad():
        assert not torch.allclose(other(samples)["loss"], opt_model(samples)["loss"])
        other.load_checkpoint(str(tmp_path / "ckpt.safetensors"))
        assert torch.allclose(other(samples)["loss"], opt_model(samples)["loss"], atol=1e-6)


@pytest.mark.parametrize("cls,model_type,llm_cfg,lo,hi", [
    (Blip2OPT, "pretrain_opt2.7b", dict(model_type="opt", vocab_size=50272, hidden_size=2560,
                                        num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                                        max_position_embeddings=2048, word_embed_proj_dim=2560), 3.7e9, 3.9e9),
    (Blip2T5, "pretrain_flant5xl", dict(model_type="t5", vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120,
                                        num_layers=24, num_heads=32, feed_forward_proj="gated-gelu",
                                        tie_word_embeddings=False), 3.8e9, 4.2e9),
])
def test_full_size_on_meta_device(cls, model_type, llm_cfg, lo, hi, tmp_path):
    """Full-size types build on the meta device from a local LLM config.json, nothing downloaded."""
    (tmp_path / "config.json").write_text(json.dumps(llm_cfg))
    with torch.device("meta"):
        model = cls.from_pretrained(model_type, **{cls.LLM_NAME_KEY: str(tmp_path)})
    counts = model.parameter_counts()
    assert lo < counts["total"] < hi, counts
    assert 0.09e9 < counts["trainable"] < 0.12e9, counts  # Q-Former query path + projection
    assert model.llm.hidden_size == (2560 if cls is Blip2OPT else 2048)


def test_hf_checkpoint_brings_llm_config_and_tokenizer(tmp_path, opt_model):
    """With weights: hf the LLM is built from the checkpoint's text_config and tokenizer (one download)."""
    from models.blip2_stage2 import hf_llm_sources

    text_config = {"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 1, "ffn_dim": 32,
                   "num_attention_heads": 4, "vocab_size": len(opt_model.llm.tokenizer), "word_embed_proj_dim": 64}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip-2", "text_config": text_config}))
    opt_model.llm.tokenizer.save_pretrained(tmp_path)
    assert hf_llm_sources(str(tmp_path)) == {"config": text_config, "tokenizer_name_or_path": str(tmp_path)}
    cfg = dict(Blip2OPT.load_zoo_config("tiny"), weights="hf", hf_hub_id=str(tmp_path), load_pretrained=True,
               opt_model="facebook/opt-that-is-not-here")
    kwargs, plan = Blip2OPT.build_kwargs(cfg)
    assert plan["checkpoints"] == [str(tmp_path)] and kwargs["load_llm_weights"] is False
    assert kwargs["llm_kwargs"]["config"] == text_config
    model = Blip2OPT(**kwargs)  # the LLM name is never looked up
    assert model.llm.model.config.num_hidden_layers == 1 and len(model.llm.tokenizer) == text_config["vocab_size"]
    assert not model._missing_key_is_expected("opt_model.model.model.decoder.layers.0.fc1.weight")  # from the file
    assert model._missing_key_is_expected("opt_model.model.lm_head.weight")  # tied alias of embed_tokens


def test_qformer_text_parts_from_stage1_checkpoint(tmp_path):
    """qformer_text_input on a stage-2 checkpoint (no text parts): they come from qformer_text_checkpoint."""
    from safetensors.torch import save_file

    from models.blip2_stage2 import QFORMER_TEXT_PARTS

    source = build(Blip2OPT, seed=3, qformer_text_input=True)
    text_state = {k: v.contiguous() for k, v in source.state_dict().items() if QFORMER_TEXT_PARTS.match(k)}
    assert any("word_embeddings" in k for k in text_state) and any(".intermediate.dense" in k for k in text_state)
    assert not any("_query" in k or "attention" in k for k in text_state)
    save_file(text_state, tmp_path / "stage1.safetensors")
    stage2 = {k: v.contiguous() for k, v in build(Blip2OPT, seed=4).trainable_state_dict().items()}
    save_file(stage2, tmp_path / "stage2.safetensors")

    model = build(Blip2OPT, seed=5, qformer_text_input=True, qformer_text_checkpoint=str(tmp_path / "stage1.safetensors"),
                  weights="lavis", pretrained=str(tmp_path / "stage2.safetensors"), load_pretrained=True)
    for key, value in text_state.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert torch.equal(model.opt_proj.weight, stage2["opt_proj.weight"])
    with pytest.raises(KeyError, match="missing keys"):  # text parts would silently stay random
        build(Blip2OPT, seed=5, qformer_text_input=True, weights="lavis", load_pretrained=True,
              pretrained=str(tmp_path / "stage2.safetensors"))


def test_t5_random_prefix_split():
    model = build(Blip2T5, prefix_lm_split="random")
    assert model.prefix_lm_split == "random"
    caption = "a small red circle left of a blue star"
    model.train()
    splits = {model.split_caption(caption) for _ in range(60)}
    assert len(splits) > 3
    for encoder_text, target in splits:
        assert f"{encoder_text} {target}".strip() == caption and target
    model.eval()
    assert model.split_caption(caption) == ("", caption)
    losses = train(model, {"image": images(), "text_input": [caption, "two green squares"]}, steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    with pytest.raises(ValueError, match="prefix_lm_split"):
        build(Blip2T5, prefix_lm_split="middle")


@pytest.mark.parametrize("cls", [Blip2OPT, Blip2T5])
def test_stage2_starts_from_stage1_checkpoint(cls, tmp_path):
    """The paper's recipe: stage 2 loads the stage-1 model (tiny types share the ViT and Q-Former sizes)."""
    from safetensors.torch import save_file

    torch.manual_seed(11)
    stage1 = registry.models.get("blip2").from_pretrained("tiny")
    state = {k: v.contiguous() for k, v in stage1.trainable_state_dict().items()}
    assert any(k.startswith("Qformer.cls.") for k in state) and "itm_head.weight" in state
    save_file(state, tmp_path / "stage1.safetensors")
    for text_input in (False, True):
        model = build(cls, weights="lavis", load_pretrained=True, pretrained=str(tmp_path / "stage1.safetensors"),
                      qformer_text_input=text_input)
        own = model.state_dict()
        shared = [k for k in own if k.startswith(("Qformer.", "query_tokens", "ln_vision"))]
        assert shared and all(torch.equal(own[k], state[k]) for k in shared)
        assert any("word_embeddings" in k for k in shared) == text_input
    broken = {k: v for k, v in state.items() if not k.startswith("query_tokens")}
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(KeyError, match="query_tokens"):
        build(cls, weights="lavis", load_pretrained=True, pretrained=str(tmp_path / "broken.safetensors"))


def test_generic_llm_types_and_mismatch():
    """Any causal LM works in blip2_opt and any seq2seq LM in blip2_t5 by config; the wrong kind is refused."""
    causal = build(Blip2OPT, llm_type="hf_causal_lm").eval()
    seq2seq = build(Blip2T5, llm_type="hf_seq2seq_lm").eval()
    samples = {"image": images(2), "text_input": ["a red circle", "two"]}
    for model in (causal, seq2seq):
        assert torch.isfinite(model(samples)["loss"]) and len(model.generate({"image": images(2)}, max_length=3)) == 2
    with pytest.raises(ValueError, match="decoder-only"):
        build(Blip2OPT, llm_type="flan_t5", opt_model="tiny:t5")
    with pytest.raises(ValueError, match="encoder-decoder"):
        build(Blip2T5, llm_type="opt", t5_model="tiny:opt")
