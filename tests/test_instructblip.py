"""Q-Former variants through ``registry.qformers`` and InstructBLIP's LAVIS behaviour, on tiny offline models:
the LAVIS-layout checkpoint (keys written out here as LAVIS names them) loads strictly and round-trips; the
instruction's truncation and scored positions follow LAVIS's formulas; a video soft prompt is the per-frame query
outputs concatenated (LAVIS's frame loop written out)."""
from __future__ import annotations

import pytest
import torch

import registry
from models import load_model

NUM_LAYERS = 2  # the tiny zoo Q-Former


@pytest.fixture(scope="module")
def vicuna():
    torch.manual_seed(0)
    return load_model("blip2_vicuna_instruct", "tiny", is_eval=True)


@pytest.fixture(scope="module")
def t5():
    torch.manual_seed(1)
    return load_model("blip2_t5_instruct", "tiny", is_eval=True)


def lavis_instruct_keys(proj: str) -> set[str]:
    """What a released LAVIS InstructBLIP ``*_trimmed.pth`` holds: the trainable parameters (Q-Former with its
    text path, query tokens, ln_vision, the projection) and the Q-Former's position-id buffer; no ViT, no LLM."""
    keys = {"query_tokens", "ln_vision.weight", "ln_vision.bias", f"{proj}.weight", f"{proj}.bias",
            "Qformer.bert.embeddings.position_ids", "Qformer.bert.embeddings.word_embeddings.weight",
            "Qformer.bert.embeddings.position_embeddings.weight", "Qformer.bert.embeddings.LayerNorm.weight",
            "Qformer.bert.embeddings.LayerNorm.bias"}
    for i in range(NUM_LAYERS):
        layer = f"Qformer.bert.encoder.layer.{i}."
        attentions = ["attention"] + (["crossattention"] if i % 2 == 0 else [])  # cross_attention_freq 2
        for attn in attentions:
            for part in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"):
                keys |= {f"{layer}{attn}.{part}.weight", f"{layer}{attn}.{part}.bias"}
        for part in ("intermediate.dense", "output.dense", "output.LayerNorm", "intermediate_query.dense",
                     "output_query.dense", "output_query.LayerNorm"):
            keys |= {f"{layer}{part}.weight", f"{layer}{part}.bias"}
    return keys


@pytest.mark.parametrize("arch, proj", [("blip2_vicuna_instruct", "llm_proj"), ("blip2_t5_instruct", "t5_proj")])
def test_lavis_layout_checkpoint_loads_strictly_and_round_trips(arch, proj, tmp_path):
    torch.manual_seed(2)
    source = load_model(arch, "tiny", is_eval=True)
    expected = lavis_instruct_keys(proj)
    trainable = {n for n, p in source.named_parameters() if p.requires_grad}
    assert trainable == expected - {"Qformer.bert.embeddings.position_ids"}  # what LAVIS trains is what we train
    state = source.state_dict()
    torch.save({"model": {k: state[k].clone() for k in sorted(expected)}}, tmp_path / "instruct_trimmed.pth")
    torch.manual_seed(3)
    target = load_model(arch, "tiny", is_eval=True)
    assert not torch.equal(target.query_tokens, source.query_tokens)
    target.load_checkpoint(str(tmp_path / "instruct_trimmed.pth"), strict=True)
    for key in expected:
        assert torch.equal(target.state_dict()[key], state[key]), key
    assert set(target.trainable_state_dict()) == expected  # and back out under the same names
    samples = {"image": torch.randn(2, 3, 64, 64), "text_input": ["what is it?", "where?"],
               "text_output": ["a cat", "left"]}
    target.visual_encoder.load_state_dict(source.visual_encoder.state_dict())  # LAVIS: from eva_vit_g.pth
    with torch.no_grad():
        torch.testing.assert_close(target(samples)["loss"], source(samples)["loss"], rtol=0, atol=0)


def test_lavis_checkpoint_with_saved_rotary_constants_loads(vicuna, tmp_path):
    """LAVIS's vendored Llama saved ``rotary_emb.inv_freq`` as a persistent buffer: such a constant is not an error."""
    state = {k: v for k, v in vicuna.state_dict().items() if k in lavis_instruct_keys("llm_proj")}
    state["llm_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    torch.save({"model": state}, tmp_path / "with_rotary.pth")
    vicuna.load_checkpoint(str(tmp_path / "with_rotary.pth"), strict=True)


def test_llm_special_tokens_grow_the_vocabulary_as_lavis_vicuna():
    model = load_model("blip2_vicuna_instruct", "tiny", llm_special_tokens={"pad_token": "[PAD]"})
    tok = model.llm.tokenizer
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == len(tok) - 1
    assert model.llm.model.get_input_embeddings().num_embeddings == len(tok)
    assert not any(p.requires_grad for p in model.llm.parameters())


def test_lavis_checkpoint_missing_a_qformer_text_tensor_is_refused(vicuna, tmp_path):
    state = {k: v for k, v in vicuna.state_dict().items() if k in lavis_instruct_keys("llm_proj")}
    del state["Qformer.bert.encoder.layer.1.output.dense.weight"]
    torch.save({"model": state}, tmp_path / "broken.pth")
    with pytest.raises(Exception, match="layer.1.output.dense.weight"):
        vicuna.load_checkpoint(str(tmp_path / "broken.pth"), strict=True)


def test_qformer_is_selected_through_the_registry(vicuna):
    from models.qformer import InstructQFormer, QFormer

    assert registry.qformers.get("instruct_qformer") is InstructQFormer
    assert registry.qformers.get("bert_qformer") is QFormer
    assert type(vicuna.Qformer) is InstructQFormer and vicuna.qformer_text_input
    opt = load_model("blip2_opt", "tiny", qformer="instruct_qformer")  # any stage-2 model takes the variant
    assert type(opt.Qformer) is InstructQFormer and opt.qformer_text_input
    assert opt.Qformer.bert.embeddings.word_embeddings is not None
    with pytest.raises(Exception, match="instruct_qformer"):  # close match named
        load_model("blip2_opt", "tiny", qformer="instruct_qformr")
    with pytest.raises(KeyError, match="query_intermediate_size.*Valid keys"):
        load_model("blip2_opt", "tiny", qformer_config={"query_intermediate_size": 8})


def test_plugin_qformer_with_its_own_config_key():
    import importlib

    plugin = importlib.import_module("projects.examples.slim_query_ffn_qformer")
    for arch in ("blip2", "blip2_opt"):
        model = load_model(arch, "tiny", qformer="slim_query_ffn_qformer", qformer_config={"query_intermediate_size": 16})
        assert isinstance(model.Qformer, plugin.SlimQueryFFNQFormer)
        assert model.Qformer.bert.encoder.layer[1].intermediate_query.dense.out_features == 16
        loss = model({"image": torch.randn(2, 3, 64, 64), "text_input": ["a red circle", "a blue star"]})["loss"]
        loss.backward()
        assert model.Qformer.bert.encoder.layer[1].output_query.dense.weight.grad.abs().sum() > 0


def test_decoder_only_instruction_layout_is_lavis(vicuna):
    """LAVIS ``concat_text_input_output``: instruction (left-truncated at max_txt_len, BOS first) + target + eos
    (right-truncated at max_output_txt_len, BOS dropped); only the target is scored."""
    tok = vicuna.llm.tokenizer
    long_instruction = "question: " + "the red circle is on the left of the blue star " * 6 + "what color?"
    target = "a small red circle to the left of a large blue star " * 4
    soft = torch.zeros(1, 8, vicuna.llm.hidden_size)
    inputs = vicuna.lm_inputs(soft, [long_instruction], [target])
    full_in = tok(long_instruction).input_ids
    instruction = [full_in[0]] + full_in[len(full_in) - vicuna.max_txt_len + 1:]  # left truncation keeps BOS
    assert len(full_in) > vicuna.max_txt_len
    answer = tok(target + tok.eos_token).input_ids[1 : vicuna.max_output_txt_len]  # right truncation, no BOS
    labels = inputs["labels"][0, 8:].tolist()
    assert labels == [-100] * len(instruction) + answer
    ids = [i for i, m in zip(inputs["labels"][0, 8:].tolist(), inputs["attention_mask"][0, 8:].tolist()) if m]
    assert len(ids) == len(instruction) + len(answer)
    q = vicuna.tokenizer([long_instruction * 3], truncation=True, max_length=vicuna.max_txt_len).input_ids[0]
    assert q[0] == vicuna.tokenizer.cls_token_id and q[-1] == vicuna.tokenizer.sep_token_id  # left-truncated


def test_t5_instruction_layout_is_lavis(t5):
    tok = t5.llm.tokenizer
    instruction = "question: " + "the red circle is on the left " * 8 + "what color?"
    soft = torch.zeros(1, 8, t5.llm.hidden_size)
    inputs = t5.lm_inputs(soft, [instruction], ["red"])
    encoder_ids = tok(instruction).input_ids[-t5.max_txt_len:]  # left truncation keeps the end (and eos)
    embedded = t5.llm.embed_tokens(torch.tensor([encoder_ids]))
    torch.testing.assert_close(inputs["inputs_embeds"][:, 8:], embedded, rtol=0, atol=0)
    assert inputs["labels"][0].tolist() == tok("red").input_ids


def test_video_soft_prompt_is_the_frames_concatenated(vicuna):
    """LAVIS's frame loop: each frame through ln_vision(encoder), the Q-Former with the instruction, the projection;
    the per-frame outputs concatenated in frame order."""
    clip = torch.randn(2, 3, 4, 64, 64, generator=torch.Generator().manual_seed(5))
    prompts = ["what happens?", "describe the video"]
    with torch.no_grad():
        got = vicuna.soft_prompt({"image": clip}, prompts)
        frames = [vicuna.soft_prompt({"image": clip[:, :, j]}, prompts) for j in range(clip.shape[2])]
    assert got.shape == (2, 4 * 8, vicuna.llm.hidden_size)
    torch.testing.assert_close(got, torch.cat(frames, dim=1), rtol=0, atol=1e-6)
    out = vicuna.generate({"image": clip, "prompt": prompts}, num_beams=2, max_length=3)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


# Released LLM sizes (Vicuna-7B with LAVIS's added [PAD] row, as Salesforce/instructblip-vicuna-7b; Flan-T5-XL).
VICUNA7B = dict(model_type="llama", vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)
FLANT5XL = dict(model_type="t5", vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24,
                num_decoder_layers=24, num_heads=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def instructblip_trainable(llm_width: int) -> int:
    """InstructBLIP's trainable parameters written out: bert-base Q-Former with its text path (12 layers, cross-
    attention to 1408-wide ViT-g features every 2nd layer, query and text FFNs), 32 queries, ln_vision, projection."""
    h, f, w, vocab, positions = 768, 3072, 1408, 30523, 512
    embeddings = vocab * h + positions * h + 2 * h
    self_attention = 4 * (h * h + h) + 2 * h
    cross_attention = 2 * (h * h + h) + 2 * (w * h + h) + 2 * h
    ffn = (h * f + f) + (f * h + h) + 2 * h
    qformer = embeddings + 12 * (self_attention + 2 * ffn) + 6 * cross_attention
    return qformer + 32 * h + 2 * w + (h * llm_width + llm_width)


@pytest.mark.slow
@pytest.mark.parametrize("arch, model_type, llm, width", [
    ("blip2_vicuna_instruct", "vicuna7b", VICUNA7B, 4096), ("blip2_t5_instruct", "flant5xl", FLANT5XL, 2048)])
def test_full_size_parameter_counts_on_meta(arch, model_type, llm, width):
    """Table 2-style counts of the released InstructBLIP models, built on the meta device offline (the LLM from its
    config): trainable = the formula above (~188M, as the InstructBLIP paper states); frozen = ViT-g + LLM."""
    from models import build_model_skeleton

    model = build_model_skeleton(arch, model_type, llm_kwargs={"config": llm})
    counts = model.parameter_counts()
    assert counts["trainable"] == instructblip_trainable(width)
    frozen = sum(p.numel() for p in model.visual_encoder.parameters()) + sum(p.numel() for p in model.llm.parameters())
    assert counts["total"] == counts["trainable"] + frozen
    assert model.visual_encoder.num_features == 1408 and len(model.visual_encoder.blocks) == 39


def test_config_checks_the_qformer_name_and_its_keys_before_building(tmp_path):
    from omegaconf import OmegaConf

    from runners.config import Config, ConfigError

    path = tmp_path / "cfg.yaml"
    base = {"model": {"arch": "blip2_opt", "model_type": "tiny"}, "run": {"task": "captioning"}}
    OmegaConf.save(OmegaConf.create(base), path)
    with pytest.raises(ConfigError, match="instruct_qformer"):
        Config(path, options=["model.qformer=instruct_qformr"])
    with pytest.raises(ConfigError, match="model.qformer_config.query_intermediate_size"):
        Config(path, options=["model.qformer_config.query_intermediate_size=8"])
    Config(path, options=["model.qformer=instruct_qformer"])


def test_t5_config_overrides_reach_the_llm():
    """LAVIS's Flan-T5 runs exact GELU in its gated FFN (the InstructBLIP Flan-T5 zoo YAMLs ask for it)."""
    from omegaconf import OmegaConf

    from models.zoo import _zoo_yaml

    assert OmegaConf.to_container(_zoo_yaml("blip2_t5_instruct", "flant5xl").model.llm_kwargs) == {
        "config_overrides": {"dense_act_fn": "gelu"}}
    model = load_model("blip2_t5_instruct", "tiny", llm_kwargs={"config_overrides": {"dense_act_fn": "gelu"}})
    act = model.llm.model.encoder.block[0].layer[1].DenseReluDense.act
    assert model.llm.model.config.dense_act_fn == "gelu" and type(act).__name__ == "GELUActivation"
    with pytest.raises(ValueError, match="no attribute 'dense_act_fnn'"):
        load_model("blip2_t5_instruct", "tiny", llm_kwargs={"config_overrides": {"dense_act_fnn": "gelu"}})
