"""Tiny offline LLM assets (OPT-style and T5-style) for tests and the ``tiny`` zoo types.

Nothing is downloaded: tokenizers are trained locally (byte-level BPE for OPT, like GPT-2's;
Metaspace BPE for T5, like SentencePiece) on a built-in word list, models are random-init from a
seed, and both are written with ``save_pretrained`` under ``$BLIP2_CACHE_ROOT/tiny/`` (default
``~/.cache/blip2``) on first use. A model name ``"tiny:opt"`` or ``"tiny:t5"`` anywhere an LLM
name is accepted resolves to that directory (see ``resolve_asset``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch
import transformers

from common.paths import cache_root
from models.lm_weights import untie_lm_head

TINY_PREFIX = "tiny:"
TINY_FORMAT_VERSION = 2  # bump when the built assets change (part of the cache key)

# Words of the synthetic captions/questions the tiny models see (plus common caption words).
TINY_WORDS = (
    "a an the of in on at to and with is are it this that there photo picture image of small large big tiny "
    "red green blue yellow purple orange white black gray brown pink cyan circle square triangle star "
    "rectangle ellipse cross shape shapes object objects left right above below top bottom middle center "
    "next beside near one two three four five zero many how what which where color colour is there yes no "
    "question answer short man woman dog cat car people sitting standing table street plate of food "
    "background foreground two cats laying couch"
).split()

TEMPLATES = (
    "a photo of a {c} {s}",
    "a {z} {c} {s} to the {p} of a {c2} {s2}",
    "question: what color is the {s}? answer: {c}",
    "question: how many shapes are there? answer: {n}",
    "question: is there a {c} {s}? answer: {yn}",
    "there is a {c} {s} on the {p}\n",
    "the {s} is {c}.",
)


def tiny_corpus(words: Iterable[str] = TINY_WORDS) -> list[str]:
    """Deterministic training text for the tokenizers: every word, and template sentences."""
    words = list(words)
    colours = [w for w in words if w in {"red", "green", "blue", "yellow", "purple", "orange", "white", "black"}]
    shapes = [w for w in words if w in {"circle", "square", "triangle", "star", "rectangle", "cross"}]
    lines = [" ".join(words[i : i + 8]) for i in range(0, len(words), 4)]
    for i, template in enumerate(TEMPLATES * 6):
        lines.append(template.format(
            c=colours[i % len(colours)], c2=colours[(i * 3 + 1) % len(colours)], s=shapes[i % len(shapes)],
            s2=shapes[(i + 2) % len(shapes)], z=["small", "large"][i % 2], p=["left", "right"][i % 2],
            n=["one", "two", "three"][i % 3], yn=["yes", "no"][i % 2],
        ))
    return lines


def build_tokenizer(kind: str, corpus: Iterable[str] | None = None, vocab_size: int = 512):
    """Train a fast tokenizer offline. ``kind="opt"``: byte-level BPE, ``</s>`` prepended as BOS,
    ``"\\n"`` one token (OPT/GPT-2 conventions). ``kind="t5"``: Metaspace BPE, ``</s>`` appended
    (ids pad 0, eos 1, unk 2 as in T5)."""
    # transformers' tokenizer modules: seconds to import, loaded on first use (tokenizers with them)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = list(corpus if corpus is not None else tiny_corpus())
    if kind == "opt":
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(corpus, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", tok.token_to_id("</s>"))]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
        )
    if kind == "t5":
        specials = ["<pad>", "</s>", "<unk>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
        tok.train_from_iterator(corpus, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    raise ValueError(f"tiny tokenizer kind must be 'opt' or 't5', got {kind!r}")


def tiny_opt_config(vocab_size: int, **overrides):
    """OPT config: 2 layers, width 64, 4 heads (ids pad 1, bos/eos 2 as in OPT)."""
    from transformers import OPTConfig  # transformers' model/config modules: seconds to import, loaded on first use

    kw = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
              max_position_embeddings=256, word_embed_proj_dim=64, pad_token_id=1, bos_token_id=2,
              eos_token_id=2, dropout=0.1, attention_dropout=0.1,
              init_std=0.1)  # HF's 0.02 makes tied-logits of a 64-wide model nearly flat: unsteerable
    kw.update(overrides)
    return OPTConfig(**kw)


def tiny_t5_config(vocab_size: int, **overrides):
    """Flan-T5-style config: gated-gelu FFN, untied lm_head, 2+2 layers, width 64."""
    from transformers import T5Config  # transformers' model/config modules: seconds to import, loaded on first use

    kw = dict(vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
              num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
              eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.1, relative_attention_num_buckets=8,
              relative_attention_max_distance=32)
    kw.update(overrides)
    return T5Config(**kw)


def build_tiny_llm(kind: str, out_dir: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Write a random-init tiny LLM + its tokenizer to ``out_dir`` (save_pretrained layout)."""
    # transformers' model/config modules: seconds to import, loaded on first use
    from transformers import OPTForCausalLM, T5ForConditionalGeneration

    tokenizer = build_tokenizer(kind)
    # real tensors even when first asked for inside ``with torch.device("meta")`` (a model skeleton)
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        if kind == "opt":
            model = OPTForCausalLM(tiny_opt_config(len(tokenizer), **config_overrides))
        else:
            config = tiny_t5_config(len(tokenizer), **config_overrides)
            model = T5ForConditionalGeneration(config)
            untie_lm_head(model)
            torch.nn.init.normal_(model.lm_head.weight, std=config.d_model**-0.5)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_llm_path(kind: str, seed: int = 0, **config_overrides) -> Path:
    """Directory of the cached tiny ``kind`` LLM ("opt" or "t5"), built atomically on first use."""
    if kind not in ("opt", "t5"):
        raise ValueError(f"tiny LLM kind must be 'opt' or 't5', got {kind!r}")
    key = json.dumps([TINY_FORMAT_VERSION, kind, seed, sorted(config_overrides.items()), transformers.__version__],
                     default=str)
    target = cache_root() / "tiny" / f"{kind}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_tiny_llm(kind, tmp, seed, **config_overrides)
        os.replace(tmp, target)  # atomic; a concurrent builder's identical result may already be there
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_asset(name: str) -> str:
    """``"tiny:opt"`` / ``"tiny:t5"`` (optionally ``"tiny:opt@SEED"``) -> local directory; other names unchanged."""
    if not isinstance(name, str) or not name.startswith(TINY_PREFIX):
        return name
    kind, _, seed = name[len(TINY_PREFIX) :].partition("@")
    return str(tiny_llm_path(kind, int(seed) if seed else 0))
