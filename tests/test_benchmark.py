"""The benchmark harness runs end to end on the tiny configuration (ours and transformers side by side)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

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
