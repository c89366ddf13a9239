"""Recall@k for image-text retrieval from score matrices.

An image has several correct captions (``img2txt[i]`` lists their indices), a caption has one
correct image (``txt2img[t]``). The rank of a query is the best rank among its correct items;
recall@k is the share of queries whose rank is < k, in percent.

Ties are resolved against the model: a correct item tied with incorrect ones is ranked after
all of them, so a constant score matrix gets chance-level recall, never 100 %.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)


def _ranks(scores: np.ndarray, positives: Sequence[Sequence[int]]) -> np.ndarray:
    """Best (0-based, pessimistic on ties) rank of the positives of each query row. scores: [Q, C]."""
    ranks = np.empty(scores.shape[0], dtype=np.int64)
    for q, pos in enumerate(positives):
        pos = np.asarray(list(pos), dtype=np.int64)
        if pos.size == 0:
            raise ValueError(f"recall@k: query {q} has no correct item")
        row = scores[q]
        negatives = np.ones(row.shape[0], dtype=bool)
        negatives[pos] = False
        best = row[pos].max()
        # Items strictly better than the best positive, plus negatives tied with it.
        ranks[q] = int((row > best).sum() + ((row == best) & negatives).sum())
    return ranks


def recall_at_k(
    scores: np.ndarray, positives: Sequence[Sequence[int]], ks: Sequence[int] = DEFAULT_KS
) -> dict[int, float]:
    """Recall@k (%) of each query row of ``scores`` [Q, C] given its correct column indices."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != len(positives):
        raise ValueError(f"recall@k: scores of shape {scores.shape} do not match {len(positives)} queries")
    ranks = _ranks(scores, positives)
    return {k: 100.0 * float((ranks < k).mean()) for k in ks}


def retrieval_metrics(
    score_i2t: np.ndarray,
    score_t2i: np.ndarray,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
) -> dict[str, float]:
    """The LAVIS set of retrieval numbers, all in %.

    score_i2t: [N_img, N_txt]; score_t2i: [N_txt, N_img]. Returns txt_r1/5/10 (image -> text),
    img_r1/5/10 (text -> image), txt_r_mean, img_r_mean, r_mean and ``agg_metrics`` (= txt_r_mean,
    as LAVIS uses it to pick the best checkpoint).
    """
    txt = recall_at_k(score_i2t, img2txt)
    img = recall_at_k(score_t2i, [[int(i)] for i in txt2img])
    out = {f"txt_r{k}": v for k, v in txt.items()}
    out.update({f"img_r{k}": v for k, v in img.items()})
    out["txt_r_mean"] = sum(txt.values()) / len(txt)
    out["img_r_mean"] = sum(img.values()) / len(img)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    out["agg_metrics"] = out["txt_r_mean"]
    return out
