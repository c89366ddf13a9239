"""(g) retrieval re-rank FLOPs: our batched ITM against LAVIS's per-pair method, counted on the meta device.

LAVIS's ``compute_sim_matrix`` pads every caption to 35 tokens and, for each image's and each text's ``k_test``
candidates, runs the full ITM pass per pair: the image's cross-attention keys/values are projected again for
every pair, and a pair that is a candidate in both directions is scored twice. Ours (``tasks/retrieval.py``)
scores each distinct pair once, trims padding columns, and projects an image's cross-attention K/V once per ITM
batch however many texts it meets. Counting runs no arithmetic (meta tensors), so it takes seconds at any size:

    python -m benchmarks.retrieval_flops              # BENCH dimensions
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode


def _count(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def itm_flops(dims: dict, text_len: int) -> dict[str, int]:
    """FLOPs of one ITM pair's pieces: the image's cross-attention K/V projection (``kv``) and the pass over
    queries + ``text_len`` tokens with that K/V precomputed (``pass``), for the BENCH-shaped stage-1 model."""
    from models.blip2_qformer import Blip2Qformer

    q, v = dims["qformer"], dims["vision"]
    with torch.device("meta"):
        model = Blip2Qformer(
            vit_model="timm", image_size=dims["image_size"], vit_precision="fp32",
            vit_kwargs={"model_name": "vit_base_patch16_224", "embed_dim": v["hidden_size"], "depth": 1,
                        "num_heads": v["num_attention_heads"], "patch_size": v["patch_size"]},
            num_query_token=dims["num_query_tokens"], cross_attention_freq=q["cross_attention_frequency"],
            qformer_config={k: q[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                             "intermediate_size")},
            tokenizer="bundled",
        ).eval().requires_grad_(False)
        tokens = (dims["image_size"] // v["patch_size"]) ** 2 + 1
        embeds = torch.empty(1, tokens, v["hidden_size"])
        ids = torch.zeros(1, text_len, dtype=torch.long)  # no padding mask: a mask changes no matmul size
        kv_flops = _count(lambda: model.Qformer.bert.image_key_values(embeds))
        kv = model.Qformer.bert.image_key_values(embeds)
        num_query = dims["num_query_tokens"]
        pass_flops = _count(lambda: model.itm_head(
            model.query_features(None, ids, None, image_key_values=kv).last_hidden_state[:, :num_query]))
    return {"kv": kv_flops, "pass": pass_flops}


def lavis_method_flops(dims: dict) -> float:
    """GFLOP of LAVIS's re-rank for ``retrieval_images`` x ``retrieval_texts`` with ``k_test``: every candidate
    pair of both directions scored separately, K/V projected per pair, captions padded to 35 tokens."""
    pairs = (dims["retrieval_images"] + dims["retrieval_texts"]) * dims["k_test"]
    per_pair = itm_flops(dims, 35)
    return pairs * (per_pair["kv"] + per_pair["pass"]) / 1e9


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench_config import CONFIGS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench", choices=sorted(CONFIGS))
    args = parser.parse_args(argv)
    dims = CONFIGS[args.config]
    pieces = itm_flops(dims, 35)
    print(f"one ITM pair at 35 tokens: image K/V {pieces['kv'] / 1e9:.2f} GFLOP + pass {pieces['pass'] / 1e9:.2f} GFLOP")
    print(f"LAVIS method, re-rank of {dims['retrieval_images']} x {dims['retrieval_texts']} with k_test "
          f"{dims['k_test']}: {lavis_method_flops(dims):.0f} GFLOP (our whole (g) pass is counted by "
          "`python -m benchmarks.run --case g`)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
