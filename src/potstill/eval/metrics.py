"""Evaluation metrics: pure functions, torch tensors or numpy arrays in, python floats out.

Classification: `accuracy`, `macro_f1`, `top1_agreement`, `classification_metrics`.
Embeddings: `mean_cosine`, `neighbour_recall_at_k`, `linear_probe_accuracy`, `similarity_spearman`,
`pair_spearman`, `embedding_metrics`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "accuracy",
    "classification_metrics",
    "embedding_metrics",
    "linear_probe_accuracy",
    "macro_f1",
    "mean_cosine",
    "neighbour_recall_at_k",
    "pair_spearman",
    "similarity_spearman",
    "top1_agreement",
]

# Rows per block in `neighbour_recall_at_k`: keeps the similarity block at CHUNK x N, not N x N.
_CHUNK = 1024


# --------------------------------------------------------------------------------------------- helpers
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _to_float_tensor(x: Any) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.dtype != torch.float64:
        t = t.to(torch.float32)
    return t


def _labels_1d(x: Any, name: str) -> np.ndarray:
    """Class ids (or names) as a 1-D array; a 2-D float array is taken as scores and argmax-ed."""
    a = _to_numpy(x)
    if a.ndim == 2:
        a = a.argmax(axis=1)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of labels (or 2-D scores), got shape {a.shape}")
    return a


def _pair(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _labels_1d(predictions, "predictions")
    y = _labels_1d(labels, "labels")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"predictions has {p.shape[0]} rows but labels has {y.shape[0]}")
    if p.shape[0] == 0:
        raise ValueError("cannot compute a metric over 0 examples")
    return p, y


def _matrix(x: Any, name: str) -> torch.Tensor:
    t = _to_float_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (rows x dims), got shape {tuple(t.shape)}")
    return t


def _rowwise_cosine(a: Any, b: Any) -> torch.Tensor:
    ta, tb = _matrix(a, "a"), _matrix(b, "b")
    if ta.shape != tb.shape:
        raise ValueError(f"row-wise cosine needs equal shapes, got {tuple(ta.shape)} and {tuple(tb.shape)}")
    dtype = torch.promote_types(ta.dtype, tb.dtype)
    return F.cosine_similarity(ta.to(dtype), tb.to(dtype), dim=1, eps=1e-12)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if x.shape[0] < 2:
        raise ValueError("Spearman correlation needs at least 2 pairs")
    res = spearmanr(x, y)
    return float(res[0])


# ------------------------------------------------------------------------------------- classification
def accuracy(predictions: Any, labels: Any) -> float:
    """Fraction of examples where the prediction equals the label.

    `predictions` may be class ids (1-D) or scores/logits (2-D, argmax-ed).
    """
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y))


def macro_f1(predictions: Any, labels: Any, num_classes: int | None = None) -> float:
    """Unweighted mean of per-class F1 over the classes present in `labels` or `predictions`.

    Same value as sklearn's `f1_score(average="macro")` (a class with no true and no predicted
    examples is not counted; a class with precision = recall = 0 counts as F1 = 0).
    `num_classes`, when given, is only a check: every id must lie in [0, num_classes).
    """
    p, y = _pair(predictions, labels)
    if num_classes is not None:
        for name, a in (("predictions", p), ("labels", y)):
            if a.dtype.kind not in "iub" or a.min() < 0 or a.max() >= num_classes:
                raise ValueError(f"{name}: class ids must be integers in [0, {num_classes})")
    classes = np.unique(np.concatenate([p, y]))
    f1s = []
    for c in classes:
        tp = float(np.sum((p == c) & (y == c)))
        fp = float(np.sum((p == c) & (y != c)))
        fn = float(np.sum((p != c) & (y == c)))
        denom = 2 * tp + fp + fn
        f1s.append(2 * tp / denom if denom > 0 else 0.0)
    return float(np.mean(f1s))


def top1_agreement(student_logits: Any, teacher_logits: Any) -> float:
    """Fraction of rows where the student's and the teacher's argmax agree."""
    s, t = _to_numpy(student_logits), _to_numpy(teacher_logits)
    if s.ndim != 2 or t.ndim != 2:
        raise ValueError(f"expected 2-D logits, got shapes {s.shape} and {t.shape}")
    return accuracy(s.argmax(axis=1), t.argmax(axis=1))


def classification_metrics(
    student_logits: Any, labels: Any | None = None, teacher_logits: Any | None = None
) -> dict[str, float]:
    """`accuracy` and `macro_f1` (when `labels` given), `agreement` (when `teacher_logits` given)."""
    out: dict[str, float] = {}
    logits = _to_numpy(student_logits)
    if logits.ndim != 2:
        raise ValueError(f"student_logits: expected 2-D (rows x classes), got shape {logits.shape}")
    if labels is not None:
        preds = logits.argmax(axis=1)
        out["accuracy"] = accuracy(preds, labels)
        out["macro_f1"] = macro_f1(preds, labels)
    if teacher_logits is not None:
        out["agreement"] = top1_agreement(logits, teacher_logits)
    return out


# ------------------------------------------------------------------------------------------ embeddings
def mean_cosine(student_emb: Any, teacher_emb: Any) -> float:
    """Mean of the row-wise cosine similarity between two (N, D) arrays of equal shape."""
    cos = _rowwise_cosine(student_emb, teacher_emb)
    if cos.numel() == 0:
        raise ValueError("cannot compute a metric over 0 rows")
    return float(cos.mean())


def _knn_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) indices of each row's k nearest other rows by cosine, computed in row blocks."""
    x = F.normalize(x, dim=1, eps=1e-12)
    n = x.shape[0]
    out = torch.empty(n, k, dtype=torch.long)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        sims = x[start:stop] @ x.T
        rows = torch.arange(stop - start)
        sims[rows, rows + start] = float("-inf")  # a row is not its own neighbour
        out[start:stop] = sims.topk(k, dim=1).indices
    return out


def neighbour_recall_at_k(student_emb: Any, teacher_emb: Any, k: int = 10) -> float:
    """How well the student keeps the teacher's neighbourhoods.

    For each row, take its k nearest other rows by cosine under the teacher and under the student;
    recall is |intersection| / k, averaged over rows. The two arrays need the same number of rows but
    may have different dims. `k` is clamped to N - 1.
    """
    s, t = _matrix(student_emb, "student_emb"), _matrix(teacher_emb, "teacher_emb")
    n = s.shape[0]
    if t.shape[0] != n:
        raise ValueError(f"student_emb has {n} rows but teacher_emb has {t.shape[0]}")
    if n < 2:
        raise ValueError(f"neighbour recall needs at least 2 rows, got {n}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, n - 1)
    t_idx = _knn_indices(t, k)
    s_idx = _knn_indices(s, k)
    hits = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        mask = torch.zeros(stop - start, n, dtype=torch.bool)
        mask.scatter_(1, t_idx[start:stop], True)
        hits[start:stop] = mask.gather(1, s_idx[start:stop]).sum(dim=1).to(torch.float64)
    return float((hits / k).mean())


def linear_probe_accuracy(
    train_emb: Any,
    train_labels: Any,
    test_emb: Any,
    test_labels: Any,
    *,
    seed: int = 0,
    C: float = 1.0,
    standardize: bool = False,
) -> float:
    """Test accuracy of a logistic regression fitted on L2-normalised train embeddings.

    With `standardize`, each feature is z-scored with the training mean and standard deviation instead (the
    BatchNorm-before-linear probe of masked-autoencoder papers), for features whose per-image differences are
    small next to a shared offset. Labels may be strings or ints.
    """
    from sklearn.linear_model import LogisticRegression

    def matrix(x: Any, name: str) -> np.ndarray:
        a = _to_numpy(x).astype(np.float64)
        if a.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D array (rows x dims), got shape {a.shape}")
        return a

    def norm(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    xtr, xte = matrix(train_emb, "train_emb"), matrix(test_emb, "test_emb")
    if standardize:
        mean, std = xtr.mean(0), np.maximum(xtr.std(0), 1e-12)
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
    else:
        xtr, xte = norm(xtr), norm(xte)
    ytr, yte = _to_numpy(train_labels), _to_numpy(test_labels)
    if xtr.shape[0] != ytr.shape[0] or xte.shape[0] != yte.shape[0]:
        raise ValueError("each embedding array needs one label per row")
    if xte.shape[0] == 0:
        raise ValueError("test set is empty")
    clf = LogisticRegression(max_iter=2000, C=C, random_state=seed)
    clf.fit(xtr, ytr)
    return float(np.mean(clf.predict(xte) == yte))


def similarity_spearman(emb: Any, sim_matrix: Any) -> float:
    """Spearman correlation between cosine similarities and human ratings over the strict upper triangle.

    `emb` is (N, D); `sim_matrix` is the (N, N) matrix of ratings (e.g. the Lee corpus, 50 x 50).
    """
    e = F.normalize(_matrix(emb, "emb"), dim=1, eps=1e-12)
    sims = _to_numpy(sim_matrix).astype(np.float64)
    n = e.shape[0]
    if sims.shape != (n, n):
        raise ValueError(f"sim_matrix must be ({n}, {n}) for {n} embeddings, got {sims.shape}")
    cos = (e @ e.T).numpy().astype(np.float64)
    iu = np.triu_indices(n, k=1)
    return _spearman(cos[iu], sims[iu])


def pair_spearman(emb_a: Any, emb_b: Any, scores: Any) -> float:
    """Spearman correlation between cosine(emb_a[i], emb_b[i]) and scores[i] (e.g. STS pairs)."""
    cos = _rowwise_cosine(emb_a, emb_b).numpy().astype(np.float64)
    sc = _to_numpy(scores).astype(np.float64).reshape(-1)
    if sc.shape[0] != cos.shape[0]:
        raise ValueError(f"{cos.shape[0]} pairs but {sc.shape[0]} scores")
    return _spearman(cos, sc)


def embedding_metrics(student_emb: Any, teacher_emb: Any, k: int = 10) -> dict[str, float]:
    """`cosine_to_teacher` (only when the dims match) and `neighbour_recall@{k}`."""
    s, t = _matrix(student_emb, "student_emb"), _matrix(teacher_emb, "teacher_emb")
    out: dict[str, float] = {}
    if s.shape[1] == t.shape[1]:
        out["cosine_to_teacher"] = mean_cosine(s, t)
    out[f"neighbour_recall@{k}"] = neighbour_recall_at_k(s, t, k=k)
    return out
