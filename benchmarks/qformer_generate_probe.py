"""Can ``transformers``' ``generate`` replace the Q-Former's own decoding loop (``models/qformer_decoding.py``)?

The Q-Former decodes on a cache that already holds the query positions (no token ids). This probe wraps a tiny
random Q-Former in a ``PreTrainedModel`` + ``GenerationMixin`` whose ``cache`` is a ``DynamicCache``
pre-filled with the query keys/values, feeds placeholder ids for the query positions so that ``generate``'s cache
positions line up, and compares ``generate`` (beam search and greedy) with ``qformer_decoding`` on the same
weights: token-for-token equality and time per call (alternating, same process).

    python -m benchmarks.qformer_generate_probe [--size tiny|base] [--batch 8] [--beams 1 3 5] [--repeats 5]
        [--repetition-penalty 1.5] [--length-penalty 0.5] [--captions 2]
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from models.qformer import QFormer
from models.qformer_config import QFormerCache
from models.qformer_decoding import beam_search, sample

PAD, BOS, EOS = 0, 1, 2
SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, encoder_width=48,
                 num_query_token=8, vocab_size=64, max_position_embeddings=64, initializer_range=0.4),
    "base": dict(encoder_width=1408, initializer_range=0.1),  # BLIP-2's: bert-base, 32 queries, 30523 tokens
}


class ProbeConfig(PretrainedConfig):
    model_type = "qformer_generate_probe"


class QFormerForGeneration(PreTrainedModel, GenerationMixin):
    """The Q-Former LM as ``generate`` sees it: one new token per step on a ``DynamicCache`` of [queries; text]."""

    config_class = ProbeConfig

    def __init__(self, config: ProbeConfig, qformer: QFormer) -> None:
        super().__init__(config)
        self.qformer = qformer
        self.num_query = qformer.config.num_query_token

    def forward(self, input_ids, cache=None, attention_mask=None, **kwargs):
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        past = QFormerCache(layers, self.num_query)
        last = input_ids[:, -1:]
        atts = torch.ones(last.shape[0], past.length + 1, dtype=torch.long, device=last.device)
        out = self.qformer(last, attention_mask=atts, past_key_values=past, use_cache=True)
        for layer, (key, value) in zip(cache.layers, out.past_key_values.layers):
            layer.keys, layer.values = key, value
        return CausalLMOutputWithPast(logits=out.logits, cache=cache)


def query_cache(qformer: QFormer, image: torch.Tensor) -> QFormerCache:
    queries = torch.randn(1, qformer.config.num_query_token, qformer.config.hidden_size,
                          generator=torch.Generator().manual_seed(1)).expand(image.shape[0], -1, -1)
    return qformer.bert(query_embeds=queries, encoder_hidden_states=image, use_cache=True).past_key_values


def ours(qformer: QFormer, cache: QFormerCache, beams: int, max_length: int, min_length: int,
         opts: argparse.Namespace) -> torch.Tensor:
    def step(last, past):
        atts = torch.ones(last.shape[0], past.length + 1, dtype=torch.long)
        out = qformer(last, attention_mask=atts, past_key_values=past, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    common = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=max_length, min_length=min_length,
                  repetition_penalty=opts.repetition_penalty)
    if beams == 1:
        return sample(step, cache, greedy=True, **common)
    return beam_search(step, cache, num_beams=beams, length_penalty=opts.length_penalty,
                       num_return_sequences=opts.captions, **common)


def hf(model: QFormerForGeneration, cache: QFormerCache, beams: int, max_length: int, min_length: int,
       opts: argparse.Namespace) -> torch.Tensor:
    batch, q = cache.layers[0][0].shape[0], cache.num_query
    expanded = cache.repeat_interleave(beams)
    dynamic = DynamicCache()
    for i, (key, value) in enumerate(expanded.layers):
        dynamic.update(key, value, i)
    ids = torch.cat([torch.full((batch, q), PAD), torch.full((batch, 1), BOS)], dim=1)  # placeholders + bos
    out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=dynamic, num_beams=beams,
                         do_sample=False, max_new_tokens=max_length - 1, min_new_tokens=min_length - 1,
                         eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS, early_stopping=False,
                         repetition_penalty=opts.repetition_penalty, length_penalty=opts.length_penalty,
                         num_return_sequences=opts.captions if beams > 1 else 1)
    return out[:, q:]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    width = max(a.shape[1], b.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=PAD)  # noqa: E731
    return torch.equal(pad(a), pad(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--min-length", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--length-penalty", type=float, default=1.0)
    parser.add_argument("--captions", type=int, default=1, help="num_return_sequences of beam search")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    args = parser.parse_args()
    torch.manual_seed(0)
    qformer = QFormer(SIZES[args.size]).eval()
    cfg = qformer.config
    model = QFormerForGeneration(ProbeConfig(vocab_size=cfg.vocab_size, is_encoder_decoder=False), qformer).eval()
    image = torch.randn(args.batch, 17, cfg.encoder_width, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = query_cache(qformer, image)
        for beams in args.beams:
            a = ours(qformer, cache, beams, args.max_length, args.min_length, args)
            try:
                b = hf(model, cache, beams, args.max_length, args.min_length, args)
            except Exception as err:  # the concrete failure is the result
                print(f"beams={beams}: transformers generate failed: {type(err).__name__}: {err}")
                continue
            rows = sum(same(x[None], y[None]) for x, y in zip(a, b))
            times = {"ours": [], "transformers": []}
            for _ in range(args.repeats):  # alternate, so contention hits both alike
                for name, fn in (("ours", lambda: ours(qformer, cache, beams, args.max_length, args.min_length, args)),
                                 ("transformers", lambda: hf(model, cache, beams, args.max_length, args.min_length,
                                                             args))):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            med = {k: sorted(v)[len(v) // 2] * 1000 for k, v in times.items()}
            print(f"beams={beams}: identical rows {rows}/{len(a)}; median ms ours {med['ours']:.1f}, "
                  f"transformers {med['transformers']:.1f} (ratio {med['transformers'] / med['ours']:.2f})")


if __name__ == "__main__":
    main()
