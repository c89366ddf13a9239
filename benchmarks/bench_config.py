"""The BENCH configuration of issue 7 (and a `tiny` one for the smoke test), as plain data.

Both frameworks are built from the same Hugging Face BLIP-2 config and the same seeded weights,
so every timing compares the same work.
"""
from __future__ import annotations

import copy

BENCH = {
    "image_size": 224,
    "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True),
    "qformer": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    cross_attention_frequency=2, encoder_hidden_size=768, vocab_size=30523),
    "num_query_tokens": 32,
    "opt": dict(model_type="opt", vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                num_attention_heads=12, word_embed_proj_dim=768, max_position_embeddings=2048,
                do_layer_norm_before=True, pad_token_id=1, bos_token_id=2, eos_token_id=2),
    "t5": dict(model_type="t5", vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8,
               num_decoder_layers=8, num_heads=6, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
    "max_txt_len": 32,
    "batch": 8,
    "gen_batch": 4,
    "gen_beams": 5,
    "gen_new_tokens": 30,
    "retrieval_images": 64,
    "retrieval_texts": 320,
    "k_test": 16,
}

TINY = copy.deepcopy(BENCH)
TINY.update(
    image_size=28,
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=28, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True),
    qformer=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 cross_attention_frequency=2, encoder_hidden_size=32, vocab_size=30523),
    num_query_tokens=4,
    opt=dict(BENCH["opt"], hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
             word_embed_proj_dim=32, vocab_size=1000),
    t5=dict(BENCH["t5"], d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
            vocab_size=1000),
    batch=2,
    gen_batch=2,
    gen_beams=2,
    gen_new_tokens=4,
    retrieval_images=4,
    retrieval_texts=8,
    k_test=2,
)

# The paper's sizes (GPU only): EVA ViT-g/14 (39 blocks kept, width 1408), the bert-base Q-Former reading 1408-wide
# features, OPT-2.7B and Flan-T5-XL; random weights, saved in bf16 (the frozen parts run in bf16 there anyway).
PAPER = copy.deepcopy(BENCH)
PAPER.update(
    vision=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True),
    qformer=dict(BENCH["qformer"], encoder_hidden_size=1408),
    opt=dict(BENCH["opt"], hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
             word_embed_proj_dim=2560),
    t5=dict(BENCH["t5"], d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32),
    batch=32,
    gen_batch=8,
    save_dtype="bf16",
)

CONFIGS = {"bench": BENCH, "tiny": TINY, "paper": PAPER}


def optimizer_for(model):
    """The runner's optimizer (``runners.optim.build_optimizer``: fused AdamW where PyTorch has the kernel)."""
    from runners.optim import build_optimizer  # deferred: the benchmark's parent process never builds a model

    return build_optimizer(model, {"init_lr": 1e-5, "beta2": 0.98, "weight_decay": 0.05, "lr_layer_decay": 1.0})
