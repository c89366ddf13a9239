"""The benchmark's fixed inputs: captions, images, autocast, and local word-level tokenizers (no hub)."""
from __future__ import annotations

import contextlib
import random
from pathlib import Path

import torch


DEVICE = torch.device("cpu")  # where both frameworks' cases run; the benchmark child sets it (--device)


def set_device(name: str) -> None:
    global DEVICE
    DEVICE = torch.device(name)


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the benchmark device for ``precision == "bf16"``, else nothing (fp32)."""
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` seeded random images [n, 3, size, size] on the benchmark device (the same in both frameworks)."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def captions(n: int, seed: int = 0, min_words: int = 8, max_words: int = 28) -> list[str]:
    """`n` deterministic captions of varied length over a synthetic vocabulary."""
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(900)}" for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def save_word_tokenizer(out_dir: str | Path, vocab_size: int, kind: str) -> None:
    """Write a word-level tokenizer whose vocabulary fits `vocab_size` (kind: opt | t5 | bert)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from models.qformer_init import init_tokenizer

    words = [f"w{i}" for i in range(900)]
    if kind == "bert":
        # filled up to the checkpoint's vocabulary (with [DEC] added last, as BLIP-2's tokenizer has it), so our
        # Q-Former can read this tokenizer too and every framework encodes the captions into the same ids
        vocab_file = Path(out_dir) / "vocab.txt"
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        entries = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
        entries += [f"[unused{i}]" for i in range(vocab_size - 1 - len(entries))]
        vocab_file.write_text("\n".join(entries) + "\n")
        init_tokenizer(str(vocab_file)).save_pretrained(out_dir)  # BLIP-2's Q-Former tokenizer class, + [DEC]
        return
    specials = {"opt": ["<unk>", "<pad>", "</s>"], "t5": ["<pad>", "</s>", "<unk>"]}[kind]
    vocab = {t: i for i, t in enumerate(specials + words + ["\n"])}
    assert len(vocab) <= vocab_size, (len(vocab), vocab_size)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    if kind == "opt":
        tk.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", vocab["</s>"])])
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>")
    else:
        tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.add_tokens(["\n"])
    tok.save_pretrained(out_dir)
