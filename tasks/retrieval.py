"""``retrieval``: image-text retrieval with ITC candidates re-ranked by ITM (BLIP-2, section 4.4).

1. Every caption -> ``text_feat`` [E]; every image -> query features [Q, E] and frozen image
   embeddings (kept on the CPU).
2. ITC similarity = max over queries of query-text cosine: ``sim`` [N_img, N_txt].
3. For each image, its ``k_test`` most similar texts are re-scored ``ITM logit + ITC sim``
   (all other entries -100); the same for each text over images.
4. recall@1/5/10 in both directions (``tasks.metrics.retrieval``), of the re-ranked scores (``txt_r1``, ...,
   as LAVIS reports) and of the ITC similarity alone (``itc_txt_r1``, ...), which shows what re-ranking adds.

Distributed: every rank encodes all images and texts (retrieval needs all of them) and
re-ranks a disjoint block of rows; the score matrices are summed over ranks. A pair that is a
candidate in both directions is scored by ITM once, and pairs go through ITM in batches. Run
options: k_test (128), text_batch_size (run.batch_size_eval or 64), itm_batch_size (128).
"""
from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, SequentialSampler

import registry
from common.device import module_device, move_to_device
from common.dist import all_reduce_sum, get_rank, get_world_size, is_main_process
from tasks.base_task import BaseTask, write_json
from tasks.metrics.retrieval import retrieval_metrics

OUTSIDE_TOP_K = -100.0  # score of pairs that were not re-ranked (as in LAVIS)


def _sequential_loader(data_loader: Any) -> Any:
    """A loader over the whole dataset in index order (eval loaders may shard or shuffle)."""
    if isinstance(data_loader, DataLoader) and not isinstance(data_loader.sampler, SequentialSampler):
        return DataLoader(
            data_loader.dataset,
            batch_size=data_loader.batch_size or 16,
            shuffle=False,
            num_workers=data_loader.num_workers,
            collate_fn=data_loader.collate_fn,
        )
    return data_loader


@torch.no_grad()
def encode_texts(model: torch.nn.Module, texts: list[str], batch_size: int, device: torch.device):
    """(text_feat [N, E] on device, text_ids [N, T], text_atts [N, T]) with right padding to the longest chunk."""
    feats, ids, atts = [], [], []
    for start in range(0, len(texts), batch_size):
        feat, tid, tatt = model.text_retrieval_features(texts[start:start + batch_size])
        feats.append(feat.float())
        ids.append(tid)
        atts.append(tatt)
    width = max(t.shape[1] for t in ids)
    ids = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in ids]
    atts = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in atts]
    return torch.cat(feats).to(device), torch.cat(ids).to(device), torch.cat(atts).to(device)


@torch.no_grad()
def encode_images(model: torch.nn.Module, loader: Any, num_images: int, device: torch.device):
    """(image_feats [N, Q, E] on device, image_embeds [N, P, W] on CPU), placed by sample ``index``."""
    feats: list[torch.Tensor | None] = [None] * num_images
    embeds: list[torch.Tensor | None] = [None] * num_images
    cursor = 0
    for samples in loader:
        images = move_to_device(samples["image"], device)
        batch_feats, batch_embeds = model.image_retrieval_features(images)
        index = samples.get("index")
        positions = index.tolist() if isinstance(index, torch.Tensor) else list(range(cursor, cursor + len(images)))
        cursor += len(images)
        for j, pos in enumerate(positions):
            feats[pos] = batch_feats[j].float()
            embeds[pos] = batch_embeds[j].cpu()
    missing = [i for i, f in enumerate(feats) if f is None]
    if missing:
        raise ValueError(f"retrieval: the loader produced no sample for {len(missing)} images, e.g. {missing[:5]}")
    return torch.stack(feats).to(device), torch.stack(embeds)


def _row_block(num_rows: int, rank: int, world: int) -> range:
    step = -(-num_rows // world)
    return range(min(rank * step, num_rows), min((rank + 1) * step, num_rows))


@torch.no_grad()
def itc_similarity(image_feats: torch.Tensor, text_feat: torch.Tensor, max_elements: int = 1 << 25) -> torch.Tensor:
    """Max over queries of query-text cosine: [N_img, Q, E] x [N_txt, E] -> [N_img, N_txt].

    Computed in image chunks so the [chunk, Q, N_txt] intermediate stays under ``max_elements``.
    """
    n_img, n_query, _ = image_feats.shape
    chunk = max(1, max_elements // max(1, n_query * text_feat.shape[0]))
    rows = [
        torch.einsum("iqe,te->iqt", image_feats[s:s + chunk], text_feat).amax(dim=1)
        for s in range(0, n_img, chunk)
    ]
    return torch.cat(rows)


@torch.no_grad()
def pair_itm_scores(
    model: torch.nn.Module,
    image_idx: torch.Tensor,
    text_idx: torch.Tensor,
    image_embeds: torch.Tensor,
    text_ids: torch.Tensor,
    text_atts: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """ITM logits [P] of (image_idx[p], text_idx[p]) pairs, each distinct pair scored once, in batches.

    Pairs are sorted by image; when the model's ``itm_scores`` takes ``image_index``, each batch
    passes its distinct images once (their cross-attention keys/values are then computed once).
    """
    n_txt = text_ids.shape[0]
    keys, inverse = torch.unique(image_idx * n_txt + text_idx, return_inverse=True)
    device = text_ids.device
    shared_images = "image_index" in inspect.signature(model.itm_scores).parameters
    scores = torch.empty(keys.shape[0], device=device)
    for s in range(0, keys.shape[0], batch_size):
        k = keys[s:s + batch_size]
        img, txt = (k // n_txt), (k % n_txt)
        if shared_images:
            distinct, index = torch.unique(img, return_inverse=True)
            embeds = image_embeds[distinct.cpu()].to(device)
            batch_scores = model.itm_scores(embeds, text_ids[txt], text_atts[txt], image_index=index)
        else:
            embeds = image_embeds[img.cpu()].to(device)
            batch_scores = model.itm_scores(embeds, text_ids[txt], text_atts[txt])
        scores[s:s + batch_size] = batch_scores.float()
    return scores[inverse]


@torch.no_grad()
def rerank_scores(
    model: torch.nn.Module,
    sim_i2t: torch.Tensor,
    image_embeds: torch.Tensor,
    text_ids: torch.Tensor,
    text_atts: torch.Tensor,
    k_test: int,
    itm_batch_size: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """ITM + ITC scores of each row's top-k candidates (all other entries -100), for this rank's
    block of rows (other rows 0), summed over ranks. sim_i2t: [N_img, N_txt] on the model device.

    A pair that is a candidate in both directions is scored by ITM once. Returns numpy
    (score_i2t [N_img, N_txt], score_t2i [N_txt, N_img]).
    """
    device = sim_i2t.device
    n_img, n_txt = sim_i2t.shape
    rank, world = get_rank(), get_world_size()
    img_rows = torch.tensor(list(_row_block(n_img, rank, world)), dtype=torch.long, device=device)
    txt_rows = torch.tensor(list(_row_block(n_txt, rank, world)), dtype=torch.long, device=device)
    k_i2t, k_t2i = min(k_test, n_txt), min(k_test, n_img)
    sim_i2t_top, txt_top = sim_i2t[img_rows].topk(k_i2t, dim=1)  # [R_i, k_i2t]
    sim_t2i_top, img_top = sim_i2t.t()[txt_rows].topk(k_t2i, dim=1)  # [R_t, k_t2i]

    image_idx = torch.cat([img_rows.repeat_interleave(k_i2t), img_top.flatten()])
    text_idx = torch.cat([txt_top.flatten(), txt_rows.repeat_interleave(k_t2i)])
    itm = pair_itm_scores(model, image_idx, text_idx, image_embeds, text_ids, text_atts, itm_batch_size)
    itm_i2t = itm[: img_rows.numel() * k_i2t].view(-1, k_i2t)
    itm_t2i = itm[img_rows.numel() * k_i2t:].view(-1, k_t2i)

    score_i2t = torch.zeros(n_img, n_txt, device=device)
    score_t2i = torch.zeros(n_txt, n_img, device=device)
    score_i2t[img_rows] = OUTSIDE_TOP_K
    score_t2i[txt_rows] = OUTSIDE_TOP_K
    score_i2t[img_rows.unsqueeze(1), txt_top] = itm_i2t + sim_i2t_top
    score_t2i[txt_rows.unsqueeze(1), img_top] = itm_t2i + sim_t2i_top

    score_i2t, score_t2i = all_reduce_sum(score_i2t), all_reduce_sum(score_t2i)
    return score_i2t.cpu().numpy(), score_t2i.cpu().numpy()


@registry.tasks.register("retrieval")
class RetrievalTask(BaseTask):
    """Zero-shot / fine-tuned image-text retrieval (COCO, Flickr30k)."""

    split_eval_across_ranks = False
    #: run keys this task reads (runners.config validates ``run:`` against them)
    RUN_KEYS = {
        "k_test": "top-k ITC candidates re-ranked by ITM (128)",
        "text_batch_size": "captions encoded per batch (default: batch_size_eval or 64)",
        "itm_batch_size": "image-text pairs per ITM forward when re-ranking (128)",
    }

    def __init__(self, run_cfg=None) -> None:
        super().__init__(run_cfg)
        self.k_test = int(self.run_cfg.get("k_test", 128))
        self.text_batch_size = int(self.run_cfg.get("text_batch_size", self.run_cfg.get("batch_size_eval", 64)))
        self.itm_batch_size = int(self.run_cfg.get("itm_batch_size", 128))
        if self.k_test < 1:
            raise ValueError(f"run.k_test={self.k_test}; expected a positive number of re-ranked candidates")

    @torch.no_grad()
    def evaluation(self, model: torch.nn.Module, data_loader: Any) -> dict[str, np.ndarray]:
        dataset = getattr(data_loader, "dataset", None)
        for attr in ("text", "txt2img", "img2txt"):
            if not hasattr(dataset, attr):
                raise TypeError(
                    f"retrieval: the eval dataset {type(dataset).__name__} has no `{attr}`; retrieval "
                    "needs a dataset exposing text, image, txt2img and img2txt"
                )
        self.eval_dataset = dataset
        was_training = model.training
        model.eval()
        try:
            device = module_device(model)
            text_feat, text_ids, text_atts = encode_texts(model, list(dataset.text), self.text_batch_size, device)
            loader = _sequential_loader(data_loader)
            image_feats, image_embeds = encode_images(model, loader, len(dataset.img2txt), device)
            # [N_img, Q, E] x [N_txt, E] -> [N_img, Q, N_txt] -> max over queries
            sim_i2t = itc_similarity(image_feats, text_feat)  # [N_img, N_txt]
            score_i2t, score_t2i = rerank_scores(
                model, sim_i2t, image_embeds, text_ids, text_atts, self.k_test, self.itm_batch_size
            )
        finally:
            model.train(was_training)
        sim = sim_i2t.float().cpu().numpy()
        return {"score_i2t": score_i2t, "score_t2i": score_t2i, "sim_i2t": sim}

    def after_evaluation(self, results: dict[str, np.ndarray], split: str, epoch: Any) -> dict[str, Any]:
        metrics = None
        if is_main_process():
            dataset = self.eval_dataset
            img2txt = [list(dataset.img2txt[i]) for i in range(len(dataset.img2txt))]
            txt2img = [int(dataset.txt2img[t]) for t in range(len(dataset.txt2img))]
            metrics = retrieval_metrics(results["score_i2t"], results["score_t2i"], img2txt, txt2img)
            itc = retrieval_metrics(results["sim_i2t"], results["sim_i2t"].T, img2txt, txt2img)  # before re-ranking
            metrics.update({f"itc_{k}": v for k, v in itc.items() if k != "agg_metrics"})
            top = min(10, results["score_i2t"].shape[1]), min(10, results["score_t2i"].shape[1])
            ranking = {
                "i2t_top": np.argsort(-results["score_i2t"], axis=1, kind="stable")[:, : top[0]].tolist(),
                "t2i_top": np.argsort(-results["score_t2i"], axis=1, kind="stable")[:, : top[1]].tolist(),
            }
            write_json(ranking, self.result_dir / f"{self.result_name(split, epoch, '_ranking')}.json")
        return self.finish_metrics(metrics, split, epoch)
