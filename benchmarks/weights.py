"""Build the shared, seeded Hugging Face BLIP-2 checkpoints that both frameworks load.

Hugging Face's default BLIP-2 init is degenerate (vision std 1e-10, zero query tokens), so every
parameter is re-drawn from N(0, 0.02) with a fixed seed (LayerNorm weights around 1).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from benchmarks.bench_config import CONFIGS


def hf_blip2_config(dims: dict, llm: str | None):
    """A `Blip2Config` with the given dimensions; `llm` is "opt", "t5" or None (retrieval model)."""
    from transformers import Blip2Config

    text_config = None if llm is None else dict(dims[llm])
    # The retrieval model runs text through the Q-Former, so it needs the text FFN.
    qformer_config = dict(dims["qformer"], use_qformer_text_input=llm is None)
    config = Blip2Config(
        vision_config=dict(dims["vision"]),
        qformer_config=qformer_config,
        text_config=text_config,
        num_query_tokens=dims["num_query_tokens"],
    )
    if llm is not None:
        # transformers >= 4.47 marks the image positions with a dedicated token; use the last id.
        config.image_token_index = dims[llm]["vocab_size"] - 1
    return config


@torch.no_grad()
def redraw_(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every parameter from a seeded normal (LayerNorm: ones/zeros) in a fixed order."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(param.shape, generator=gen) * 0.02
        is_norm_weight = "norm" in name.lower() and param.ndim == 1 and name.endswith("weight")
        param.copy_((noise + 1.0 if is_norm_weight else noise).to(param.device))


def build_checkpoint(kind: str, config_name: str, root: str | os.PathLike) -> Path:
    """Create (once) `root/<config>_<kind>` with a seeded HF checkpoint; kind in opt|t5|retrieval."""
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    out = Path(root) / f"{config_name}_{kind}"
    if (out / "config.json").exists():
        return out
    dims = CONFIGS[config_name]
    torch.manual_seed(0)
    # paper size: initialise on the GPU when there is one (billions of parameters), save in bf16
    build_on = "cuda" if dims.get("save_dtype") == "bf16" and torch.cuda.is_available() else "cpu"
    with torch.device(build_on):
        if kind == "retrieval":
            model = Blip2ForImageTextRetrieval(hf_blip2_config(dims, None))
        else:
            model = Blip2ForConditionalGeneration(hf_blip2_config(dims, kind))
            if kind == "t5":
                model.language_model.config.tie_word_embeddings = False
    redraw_(model)
    if dims.get("save_dtype") == "bf16":
        model.to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(out)
    return out
