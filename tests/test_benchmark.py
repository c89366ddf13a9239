"""The benchmark harness runs end to end on the tiny configuration (ours and transformers side by side)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_benchmark_runs_on_tiny_config(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--config", "tiny", "--frameworks", "ours,hf", "--precisions", "fp32",
         "--repeats", "1", "--threads", "1", "--case", "b,f_text,f_itm", "--work-dir", str(tmp_path / "work"),
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["case"]: row for row in result["rows"]}
    assert set(rows) == {"b", "f_text", "f_itm"}
    assert rows["b"]["ours"]["median_s"] > 0 and rows["b"]["hf"]["median_s"] > 0
    assert rows["b"]["ours"]["gflop"] > 0 and rows["b"]["ratio_ours_over_hf"] > 0
    assert "ours" not in rows["f_itm"] and rows["f_itm"]["hf"]["median_s"] > 0
    assert rows["f_text"]["ours"]["median_s"] > 0 and rows["f_text"]["hf"]["median_s"] > 0  # same-run reference
    assert result["matmul_peak_gflops"]["fp32"] > 0
    assert isinstance(result["machine"]["bf16_native"], bool) and result["machine"]["cpu"]


def test_retrieval_flops_match_the_written_out_count():
    """(g)'s LAVIS-method count from the meta device equals the matmul FLOPs written out for the tiny shapes."""
    from benchmarks.bench_config import TINY
    from benchmarks.retrieval_flops import itm_flops, lavis_method_flops

    q, v = TINY["qformer"], TINY["vision"]
    hidden, width, inter = q["hidden_size"], v["hidden_size"], q["intermediate_size"]
    tokens = (TINY["image_size"] // v["patch_size"]) ** 2 + 1
    cross_layers = len(range(0, q["num_hidden_layers"], q["cross_attention_frequency"]))
    kv = cross_layers * 2 * (2 * tokens * width * hidden)  # K and V projections of the image tokens
    n_q, n_t = TINY["num_query_tokens"], 35
    n = n_q + n_t
    layer = 2 * n * hidden * hidden * 4 + 2 * 2 * n * n * hidden  # Q, K, V, O projections + scores and context
    layer += 2 * 2 * n * hidden * inter  # query FFN on the queries + text FFN on the text: every position once
    cross = 2 * n_q * hidden * hidden * 2 + 2 * 2 * n_q * tokens * hidden  # Q, O on queries + attention
    expected_pass = q["num_hidden_layers"] * layer + cross_layers * cross + 2 * n_q * hidden * 2  # + ITM head
    pieces = itm_flops(TINY, 35)
    assert pieces == {"kv": kv, "pass": expected_pass}
    pairs = (TINY["retrieval_images"] + TINY["retrieval_texts"]) * TINY["k_test"]
    assert lavis_method_flops(TINY) == pytest.approx(pairs * (kv + expected_pass) / 1e9)


def test_benchmark_bert_tokenizer_encodes_words_like_our_qformer_reads_it(tmp_path):
    """The retrieval checkpoint's tokenizer knows the caption words (no [UNK]) and holds the checkpoint's 30523 tokens,
    so our Q-Former, transformers and LAVIS all read it and encode the benchmark's captions into the same ids."""
    from transformers import AutoTokenizer

    from benchmarks.text import captions, save_word_tokenizer
    from models.qformer_init import init_tokenizer

    save_word_tokenizer(tmp_path, 30523, "bert")
    theirs, ours = AutoTokenizer.from_pretrained(tmp_path), init_tokenizer(str(tmp_path))
    texts = captions(3, seed=2)
    ids = theirs(texts, padding="longest").input_ids
    assert ours(texts, padding="longest").input_ids == ids
    assert len(ours) == len(theirs) == 30523 and ours.bos_token_id == 30522  # [DEC] last, as in BLIP-2
    words = texts[0].split()
    assert ids[0][: len(words) + 2] == [2] + [5 + int(w[1:]) for w in words] + [3]  # [CLS] w<n> ... [SEP]


def test_benchmark_skips_lavis_without_its_interpreter(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--config", "tiny", "--frameworks", "lavis", "--case", "f_text",
         "--lavis-python", str(tmp_path / "missing" / "python"), "--out", str(tmp_path / "bench.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LAVIS skipped" in proc.stdout and "does not exist" in proc.stdout


LAVIS_PYTHON = os.environ.get("BLIP2_LAVIS_PYTHON")


@pytest.mark.slow
@pytest.mark.skipif(not (LAVIS_PYTHON and Path(LAVIS_PYTHON).is_file()),
                    reason="set BLIP2_LAVIS_PYTHON to a venv with salesforce-lavis 1.0.2 (docs/benchmarks.md)")
def test_lavis_case_computes_our_features_on_shared_weights(tmp_path):
    """The benchmark's LAVIS model is the released Blip2Qformer doing our work: with our weights loaded (same key
    names) and the same captions and images, its extract_features equals ours in all three modes (fp32, 1e-5)."""
    from benchmarks.bench_config import TINY
    from benchmarks.ours_cases import _load
    from benchmarks.run import _prepare_checkpoints
    from benchmarks.text import captions, images

    ckpt = _prepare_checkpoints("tiny", {"retrieval"}, tmp_path)["retrieval"]
    model = _load(ckpt, "fp32", is_eval=True, tokenizer=ckpt)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    script = (
        "import sys, torch\n"
        "from benchmarks.bench_config import TINY\n"
        "from benchmarks.lavis_cases import build_blip2_qformer\n"
        "from benchmarks.text import captions, images\n"
        "model = build_blip2_qformer(sys.argv[1], TINY)\n"
        "model.load_state_dict(torch.load(sys.argv[2], weights_only=True), strict=True)\n"
        "samples = {'image': images(2, TINY['image_size'], seed=2), 'text_input': captions(2, seed=2)}\n"
        "out = {m: model.extract_features(samples, mode=m) for m in ('image', 'text', 'multimodal')}\n"
        "torch.save({'image': out['image'].image_embeds_proj, 'text': out['text'].text_embeds_proj,\n"
        "            'multimodal': out['multimodal'].multimodal_embeds}, sys.argv[3])\n"
    )
    proc = subprocess.run([LAVIS_PYTHON, "-c", script, ckpt, str(tmp_path / "weights.pt"), str(tmp_path / "lavis.pt")],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lavis = torch.load(tmp_path / "lavis.pt", weights_only=True)
    samples = {"image": images(2, TINY["image_size"], seed=2), "text_input": captions(2, seed=2)}
    ours = {m: model.extract_features(samples, mode=m) for m in ("image", "text", "multimodal")}
    torch.testing.assert_close(ours["image"].image_embeds_proj, lavis["image"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["text"].text_embeds_proj, lavis["text"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["multimodal"].multimodal_embeds, lavis["multimodal"], atol=1e-5, rtol=1e-5)


def test_interleaved_served_child_times_one_call_per_request(tmp_path):
    """benchmarks.interleaved's child protocol (used for LAVIS's venv): set up once, then one timed call per request."""
    from benchmarks.interleaved import _served
    from benchmarks.run import _prepare_checkpoints

    ckpt = _prepare_checkpoints("tiny", {"retrieval"}, tmp_path)["retrieval"]
    call = _served({"framework": "ours", "case": "f_text", "precision": "fp32", "config": "tiny", "ckpt": ckpt,
                    "threads": 1}, sys.executable)
    times = [call(), call()]
    assert all(isinstance(t, float) and 0 < t < 60 for t in times)
