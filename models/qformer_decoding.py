"""Incremental text decoding for the Q-Former (captioning): greedy, beam search and nucleus sampling.

Decoding runs on top of a ``QFormerCache`` that already holds the query positions, so every step feeds one token
per sequence and attends to the cached queries and earlier tokens; the image is never touched again. The logits
processors (repetition penalty, minimum length, temperature, top-p) are ``transformers``'.
Hand-written: ``transformers`` 5.25 ``generate``, driven through a wrapper that feeds placeholder ids for the queries
(``benchmarks/qformer_generate_probe.py``), matches it at the defaults but penalises the placeholders (0/8 rows equal
at repetition penalty 1.5), bounds early stopping unlike the released code (7/8 at length penalty -1), 1.1-1.5x slower.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from transformers import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from models.qformer_config import QFormerCache

# step(last_tokens [N, 1], cache) -> (logits [N, V], new cache)
StepFn = Callable[[Tensor, QFormerCache], tuple[Tensor, QFormerCache]]


def _processors(min_length: int, eos_id: int, repetition_penalty: float) -> LogitsProcessorList:
    """``transformers``' repetition penalty (CTRL-style) and minimum length (no eos while the sequence, bos included,
    is shorter than ``min_length``), applied to fp32 logits."""
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if min_length > 1:
        processors.append(MinLengthLogitsProcessor(min_length, eos_id))
    return processors


@torch.no_grad()
def sample(
    step: StepFn,
    cache: QFormerCache,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_length: int,
    min_length: int = 1,
    top_p: float = 0.9,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Greedy or nucleus sampling, one sequence per cache row. Returns ids [N, <= max_length] starting with bos."""
    batch = cache.layers[0][0].shape[0]
    device = cache.layers[0][0].device
    sequences = torch.full((batch, 1), bos_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    processors = _processors(min_length, eos_id, repetition_penalty)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(max(temperature, 1e-5))])
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    while sequences.shape[1] < max_length and not bool(finished.all()):
        logits, cache = step(sequences[:, -1:], cache)
        logits = processors(sequences, logits.float())
        if greedy:
            next_tokens = logits.argmax(-1)
        else:
            probs = warpers(sequences, logits).softmax(-1)
            next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_id), next_tokens)
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        finished |= next_tokens == eos_id
    return sequences


@torch.no_grad()
def beam_search(
    step: StepFn,
    cache: QFormerCache,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    num_beams: int,
    max_length: int,
    min_length: int = 1,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    num_return_sequences: int = 1,
) -> Tensor:
    """Beam search over a cache holding one row per input (expanded to beams here).

    Finished hypotheses are scored ``sum log p / generated_len ** length_penalty``; a batch entry stops when it holds
    ``num_beams`` hypotheses that no running beam can beat. Returns ids [B * num_return_sequences, L] (bos first,
    pad after eos), best first per input.
    """
    if num_return_sequences > num_beams:
        raise ValueError(f"num_captions ({num_return_sequences}) cannot exceed num_beams ({num_beams})")
    batch = cache.layers[0][0].shape[0]
    device = cache.layers[0][0].device
    cache = cache.repeat_interleave(num_beams)
    sequences = torch.full((batch * num_beams, 1), bos_id, dtype=torch.long, device=device)
    beam_scores = torch.zeros(batch, num_beams, device=device)
    beam_scores[:, 1:] = -1e9  # all beams start identical: only the first may expand at step 1
    beam_scores = beam_scores.view(-1)
    hypotheses: list[list[tuple[float, Tensor]]] = [[] for _ in range(batch)]
    done = [False] * batch

    processors = _processors(min_length, eos_id, repetition_penalty)

    def score(sum_logprobs: float, generated: int) -> float:
        return sum_logprobs / (max(generated, 1) ** length_penalty)

    while sequences.shape[1] < max_length and not all(done):
        cur_len = sequences.shape[1]
        logits, cache = step(sequences[:, -1:], cache)
        logits = processors(sequences, logits.float())
        logprobs = logits.log_softmax(-1) + beam_scores[:, None]  # [B*K, V]
        vocab = logprobs.shape[-1]
        top_scores, top_ids = logprobs.view(batch, -1).topk(2 * num_beams, dim=1)  # [B, 2K]
        next_scores = torch.full((batch, num_beams), -1e9, device=device)
        next_tokens = torch.full((batch, num_beams), pad_id, dtype=torch.long, device=device)
        next_source = torch.arange(batch * num_beams, device=device).view(batch, num_beams)  # keep order if done
        top_scores_list, top_ids_list = top_scores.tolist(), top_ids.tolist()
        for b in range(batch):
            if done[b]:
                continue
            slot = 0
            for cand_score, cand in zip(top_scores_list[b], top_ids_list[b]):
                beam, token = divmod(cand, vocab)
                source = b * num_beams + beam
                if token == eos_id:
                    hyp = torch.cat([sequences[source], torch.tensor([eos_id], device=device)])
                    hypotheses[b].append((score(cand_score, cur_len), hyp))
                    hypotheses[b].sort(key=lambda h: -h[0])
                    del hypotheses[b][num_beams:]
                    continue
                next_scores[b, slot], next_tokens[b, slot], next_source[b, slot] = cand_score, token, source
                slot += 1
                if slot == num_beams:
                    break
            best_running = next_scores[b].max().item()
            if len(hypotheses[b]) == num_beams and hypotheses[b][-1][0] >= score(best_running, cur_len):
                done[b] = True
        source = next_source.view(-1)
        sequences = torch.cat([sequences[source], next_tokens.view(-1, 1)], dim=1)
        cache = cache.index_select(source)
        beam_scores = next_scores.view(-1)
    # Running beams at max_length become hypotheses too.
    cur_len = sequences.shape[1]
    for b in range(batch):
        if done[b]:
            continue
        for k in range(num_beams):
            idx = b * num_beams + k
            hypotheses[b].append((score(beam_scores[idx].item(), cur_len - 1), sequences[idx]))
        hypotheses[b].sort(key=lambda h: -h[0])
    outputs = [h for b in range(batch) for _, h in hypotheses[b][:num_return_sequences]]
    length = max(len(h) for h in outputs)
    result = torch.full((len(outputs), length), pad_id, dtype=torch.long, device=device)
    for i, h in enumerate(outputs):
        result[i, : len(h)] = h
    return result
