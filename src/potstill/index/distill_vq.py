"""Distill-VQ: learn an IVF-PQ index by listwise distillation of the dense scores, then export it to FAISS.

Xiao et al. 2022, "Distill-VQ: Learning Retrieval Oriented Vector Quantization By Distilling Knowledge from
Dense Embeddings" (SIGIR 2022); official code staoxiao/LibVQ (LibVQ/models/learnable_vq.py,
pq_quantizer.py, ivf_quantizer.py, train.py, learnable_index/learnable_index.py).

The dense embeddings are the teacher, the quantiser the student; no labels are used. For a training query
q with candidate documents D_q (its dense top-K, plus the other queries' candidates in the batch):

- teacher  t_qd = ⟨v_q, v_d⟩ (metric "ip") or −‖v_q − v_d‖² ("l2"), on the exact vectors;
- students s^IVF_qd = sim(v_q, o_c(d)) (the coarse centroid alone) and s^PQ_qd = sim(v_q, o_c(d) + û_d)
  (the full IVF-PQ reconstruction), with the coarse assignment c(d) of the initial index kept fixed;
- loss     L = Σ_q KL(softmax_Dq(t/T) ‖ softmax_Dq(s^PQ/T)) + w_IVF · KL(softmax_Dq(t/T) ‖ softmax_Dq(s^IVF/T)).

The paper's ListNet loss is the cross-entropy H(p_t, p_s) = KL(p_t ‖ p_s) + H(p_t); with a fixed teacher the
two differ by a constant, so the gradients are the same (`potstill.losses.listwise_kl` is used). IVF and PQ
are distilled jointly: the PQ term trains the codebooks and (through o_c(d) and the residual) the centroids,
the IVF term trains the centroids so that probing lists by sim(q, o) follows the teacher. PQ is made
differentiable by the straight-through soft assignment of `IVFPQ.forward`.

Defaults (paper / LibVQ): temperature T = 1, top-K = 200, Adam learning rates 1e-4 (PQ codebooks) and 1e-3
(IVF centroids), linear warm-up over the first 10% of the steps then linear decay, 5 epochs, codebooks
without weight decay, w_IVF = 1 (the paper's sum); batch 16 queries (LibVQ: 128 pairs; here every query brings
its whole top-K, so memory, not the paper, sets it). Departures, stated: LibVQ scales the IVF loss by the ratio of
the first batch's PQ to IVF cross-entropy (`ivf_weight="scaled_to_pq"` reproduces it), updates the
centroids by plain gradient descent rather than Adam, and scores each batch's queries against the positive and
one sampled top-400 negative of every query in the batch (here: all of each query's top-K plus the batch's
other candidates). The query and document encoders stay fixed (LibVQ's label-free `LearnableIndex.fit`
fixes both); training a query encoder jointly, and OPQ rotations, are not implemented. For unit-norm
(cosine) embeddings, whose scores lie in [−1, 1], T = 1 gives a nearly flat teacher; T ≈ 0.05 (the scale 20
of sentence-transformers' losses) is the useful range.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from potstill.losses import listwise_kl

from .ivfpq import IVFPQ, _check_shape, as_float32_matrix, check_metric, export_faiss, import_faiss, train_faiss_ivfpq

__all__ = ["DistillVQResult", "distill_vq", "exact_search", "export_faiss", "retrieval_agreement"]

IVF_WEIGHTS = ("scaled_to_pq",)


@dataclass
class DistillVQResult:
    """What `distill_vq` returns.

    `quantiser` the learned IVFPQ; `initial` the FAISS k-means quantiser it started from; `list_ids` `(n_docs,)`
    the fixed coarse assignment used in training (that of `initial`); `ivf_weight` the w_IVF used;
    `history` one dict per step (step, loss, pq_kl, ivf_kl, lr_factor).
    """

    quantiser: IVFPQ
    initial: IVFPQ
    list_ids: Tensor
    ivf_weight: float
    history: list[dict] = field(default_factory=list)


def _similarity(metric: str, q: Tensor, v: Tensor) -> Tensor:
    ip = q @ v.T
    if metric == "ip":
        return ip
    return 2 * ip - (q * q).sum(-1, keepdim=True) - (v * v).sum(-1)


@torch.no_grad()
def exact_search(
    queries: Any, docs: Any, k: int, *, metric: str = "ip", chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """Exact (flat) search: the `k` documents with the highest ⟨q, d⟩ ("ip") or lowest ‖q − d‖² ("l2").

    Returns (similarities, labels) `(nq, min(k, n_docs))`, best first; for "l2" the similarity is −‖q − d‖².
    """
    check_metric(metric)
    q = torch.from_numpy(as_float32_matrix(queries, "queries"))
    d = torch.from_numpy(as_float32_matrix(docs, "docs", q.shape[1]))
    k = min(int(k), d.shape[0])
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    values, labels = [], []
    for start in range(0, q.shape[0], chunk_size):
        top = _similarity(metric, q[start : start + chunk_size], d).topk(k, dim=-1)
        values.append(top.values)
        labels.append(top.indices)
    return torch.cat(values), torch.cat(labels)


def retrieval_agreement(found: Any, exact: Any, *, k: int = 10) -> dict[str, float]:
    """How well approximate results `found` `(nq, ≥k)` reproduce the exact ranking `exact` `(nq, ≥k)`.

    recall@k = mean_q |found_q[:k] ∩ exact_q[:k]| / k (the share of the exact top-k that is retrieved);
    mrr@k = mean_q 1 / rank of exact_q[0] (the exact nearest neighbour) in found_q[:k], 0 when absent.
    Labels of -1 (FAISS's "no result") never match.
    """
    found = np.asarray(found.cpu() if isinstance(found, Tensor) else found)
    exact = np.asarray(exact.cpu() if isinstance(exact, Tensor) else exact)
    if found.ndim != 2 or exact.ndim != 2 or found.shape[0] != exact.shape[0]:
        raise ValueError(f"found and exact must be (nq, k) with the same nq, got {found.shape} and {exact.shape}")
    if found.shape[1] < k or exact.shape[1] < k:
        raise ValueError(f"need at least k={k} columns, got found {found.shape[1]} and exact {exact.shape[1]}")
    f, e = found[:, :k], exact[:, :k]
    hits = (f[:, :, None] == e[:, None, :]) & (f[:, :, None] >= 0)
    recall = hits.any(-1).sum(-1) / k
    first = f == e[:, :1]
    rank = np.where(first.any(-1), first.argmax(-1) + 1, np.inf)
    return {f"recall@{k}": float(recall.mean()), f"mrr@{k}": float((1.0 / rank).mean())}


def _as_quantiser(init: Any, soft_temperature: float) -> IVFPQ:
    if isinstance(init, IVFPQ):
        quantiser = copy.deepcopy(init)
        quantiser.soft_temperature = float(soft_temperature)
        return quantiser
    faiss = import_faiss()
    if isinstance(init, faiss.Index):
        return IVFPQ.from_faiss(init, soft_temperature=soft_temperature)
    raise TypeError(f"init must be a potstill IVFPQ or a trained faiss.IndexIVFPQ, got {type(init).__name__}")


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then linear decay to 0 at `total` (transformers' schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def distill_vq(
    doc_embeddings: Any,
    query_embeddings: Any,
    *,
    nlist: int,
    m: int,
    nbits: int = 8,
    metric: str = "ip",
    init: Any = None,
    top_k: int = 200,
    in_batch: bool = True,
    temperature: float = 1.0,
    batch_size: int = 16,
    epochs: int = 5,
    max_steps: int | None = None,
    pq_lr: float = 1e-4,
    ivf_lr: float = 1e-3,
    ivf_weight: float | str = 1.0,
    warmup_ratio: float = 0.1,
    train_pq: bool = True,
    train_ivf: bool = True,
    soft_temperature: float = 1.0,
    seed: int = 0,
    faiss_seed: int = 1234,
    progress: bool = False,
) -> DistillVQResult:
    """Learn IVF centroids and PQ codebooks by listwise KD from the dense scores (see the module docstring).

    `doc_embeddings` `(n, d)` and `query_embeddings` `(nq, d)` are fixed vectors (numpy or torch). The
    quantiser starts from `init` (a potstill `IVFPQ` or a trained `faiss.IndexIVFPQ`), by default from FAISS's
    own k-means training on the documents (`train_faiss_ivfpq(doc_embeddings, nlist, m, nbits, metric,
    seed=faiss_seed)`). Each step takes `batch_size` training queries (shuffled each epoch with `seed`); their
    candidates are the union of their dense top-`top_k` documents, so every query is also scored against the
    other queries' candidates (`in_batch=False`: its own top-K only). Runs `epochs` passes, or `max_steps` steps
    when given. `ivf_weight` is w_IVF, a float or "scaled_to_pq" (LibVQ: the first batch's PQ/IVF
    cross-entropy ratio). `train_pq` / `train_ivf` freeze either part.

    Memory per step is O(U·M·ksub) with U ≤ batch_size·top_k the distinct candidates of the batch.
    Defaults: nbits=8, metric="ip", top_k=200, in_batch=True, temperature=1.0, batch_size=16, epochs=5,
    pq_lr=1e-4, ivf_lr=1e-3, ivf_weight=1.0, warmup_ratio=0.1, soft_temperature=1.0.
    """
    check_metric(metric)
    docs_np = as_float32_matrix(doc_embeddings, "doc_embeddings")
    queries_np = as_float32_matrix(query_embeddings, "query_embeddings", docs_np.shape[1])
    n_docs, d = docs_np.shape
    _check_shape(d, nlist=nlist, m=m, nbits=nbits)
    for name, value in (("temperature", temperature), ("pq_lr", pq_lr), ("ivf_lr", ivf_lr)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if isinstance(ivf_weight, str):
        if ivf_weight not in IVF_WEIGHTS:
            raise ValueError(f"ivf_weight must be a float >= 0 or one of {IVF_WEIGHTS}, got {ivf_weight!r}")
    elif not (math.isfinite(ivf_weight) and ivf_weight >= 0):
        raise ValueError(f"ivf_weight must be >= 0, got {ivf_weight!r}")
    if top_k < 1 or batch_size < 1 or epochs < 1 or (max_steps is not None and max_steps < 1):
        raise ValueError("top_k, batch_size, epochs and max_steps must be >= 1")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio!r}")
    if not (train_pq or train_ivf):
        raise ValueError("nothing to train: train_pq and train_ivf are both False")

    if init is None:
        init = train_faiss_ivfpq(docs_np, nlist=nlist, m=m, nbits=nbits, metric=metric, seed=faiss_seed)
    quantiser = _as_quantiser(init, soft_temperature)
    if (quantiser.d, quantiser.nlist, quantiser.m, quantiser.nbits, quantiser.metric) != (d, nlist, m, nbits, metric):
        raise ValueError(
            f"init has d={quantiser.d}, nlist={quantiser.nlist}, m={quantiser.m}, nbits={quantiser.nbits}, "
            f"metric={quantiser.metric!r}; expected d={d}, nlist={nlist}, m={m}, nbits={nbits}, metric={metric!r}"
        )
    initial = copy.deepcopy(quantiser).requires_grad_(False)

    docs = torch.from_numpy(docs_np)
    queries = torch.from_numpy(queries_np)
    list_ids = quantiser.assign(docs)  # fixed during training (Distill-VQ)
    k = min(int(top_k), n_docs)
    _, teacher_top = exact_search(queries_np, docs_np, k, metric=metric)

    quantiser.centroids.requires_grad_(train_ivf)
    quantiser.codebooks.requires_grad_(train_pq)
    groups = []
    if train_pq:
        groups.append({"params": [quantiser.codebooks], "lr": pq_lr, "name": "pq"})
    if train_ivf:
        groups.append({"params": [quantiser.centroids], "lr": ivf_lr, "name": "ivf"})
    optimizer = torch.optim.Adam(groups)
    base_lrs = [g["lr"] for g in groups]

    nq = queries.shape[0]
    steps_per_epoch = math.ceil(nq / batch_size)
    total = steps_per_epoch * epochs if max_steps is None else int(max_steps)
    warmup = int(warmup_ratio * total)
    generator = torch.Generator().manual_seed(int(seed))
    weight = None if isinstance(ivf_weight, str) else float(ivf_weight)
    history: list[dict] = []

    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("Distill-VQ", total=total)
    try:
        step = 0
        while step < total:
            order = torch.randperm(nq, generator=generator)
            for start in range(0, nq, batch_size):
                if step >= total:
                    break
                batch = order[start : start + batch_size]
                q = queries[batch]
                cand, inverse = torch.unique(teacher_top[batch], return_inverse=True)
                mask = None
                if not in_batch:
                    mask = torch.zeros(batch.shape[0], cand.shape[0], dtype=torch.bool)
                    mask.scatter_(1, inverse, True)
                teacher = _similarity(metric, q, docs[cand])
                out = quantiser(docs[cand], list_ids[cand])
                pq_kl = listwise_kl(_similarity(metric, q, out.quantized), teacher, temperature=temperature, mask=mask)
                ivf_kl = listwise_kl(_similarity(metric, q, out.coarse), teacher, temperature=temperature, mask=mask)
                if weight is None:  # "scaled_to_pq": ratio of the first batch's cross-entropies, then fixed
                    with torch.no_grad():
                        t = teacher / temperature
                        if mask is not None:
                            t = t.masked_fill(~mask, float("-inf"))
                        logp = torch.log_softmax(t, -1)
                        entropy = -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1).mean()
                        weight = float((pq_kl + entropy) / (ivf_kl + entropy + 1e-6))
                loss = pq_kl + weight * ivf_kl if train_ivf else pq_kl
                factor = _lr_factor(step, total, warmup)
                for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = lr * factor
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                history.append(
                    {"step": step, "loss": loss.item(), "pq_kl": pq_kl.item(), "ivf_kl": ivf_kl.item(),
                     "lr_factor": factor}
                )
                step += 1
                if bar is not None:
                    bar.update(task, advance=1)
    finally:
        if bar is not None:
            bar.stop()
    quantiser.requires_grad_(False)
    return DistillVQResult(
        quantiser=quantiser, initial=initial, list_ids=list_ids, ivf_weight=float(weight or 0.0), history=history
    )
