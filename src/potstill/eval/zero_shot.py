"""Vision–language metrics: zero-shot classification with prompt-ensembled class text, and image↔text retrieval.

- `prompt_ensemble`: the class text feature of CLIP's prompt ensembling — each class's captions ("a photo of
  the digit {name}", ...) embedded, L2-normalised, averaged, and normalised again (Radford et al. 2021, §3.1.4).
- `zero_shot_metrics`: top-1 accuracy of argmax_c ⟨ℓ2n(image), t_c⟩, and top-1 agreement with a teacher's
  zero-shot predictions.
- `retrieval_recall`: R@k in both directions, as CLIP and image–text retrieval papers report it: the share of
  queries with at least one relevant item among their k best-scored. Relevance is a boolean (images, texts)
  matrix, so a class-captioned set (every image of class c matches every caption of c) is scored too.
"""

from __future__ import annotations

from torch import Tensor


def _normalize(x: Tensor) -> Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def prompt_ensemble(text_features: Tensor) -> Tensor:
    """(C, K, D) embeddings of K captions per class → (C, D) unit class features (mean of unit vectors, renormed)."""
    if text_features.dim() != 3:
        raise ValueError(f"expected (classes, templates, dim) text features, got shape {tuple(text_features.shape)}")
    return _normalize(_normalize(text_features).mean(dim=1))


def zero_shot_predictions(image_features: Tensor, class_features: Tensor) -> Tensor:
    """argmax_c ⟨ℓ2n(image), ℓ2n(t_c)⟩ for (N, D) images and (C, D) classes."""
    return (_normalize(image_features) @ _normalize(class_features).T).argmax(dim=-1)


def zero_shot_metrics(image_features: Tensor, class_features: Tensor, labels: Tensor | None = None,
                      teacher_predictions: Tensor | None = None) -> dict[str, float]:
    """`accuracy` (with labels; rows labelled < 0 are skipped) and `agreement` (share of images whose zero-shot
    class equals the teacher's)."""
    predictions = zero_shot_predictions(image_features, class_features)
    out: dict[str, float] = {}
    if labels is not None:
        keep = labels >= 0
        if bool(keep.any()):
            out["accuracy"] = float((predictions[keep] == labels[keep]).float().mean())
    if teacher_predictions is not None:
        out["agreement"] = float((predictions == teacher_predictions).float().mean())
    return out


def _hit_rate(scores: Tensor, relevant: Tensor, k: int) -> float:
    """Share of rows (with ≥ 1 relevant column) that have a relevant column among their k highest scores."""
    counted = relevant.any(dim=1)
    if not bool(counted.any()):
        return float("nan")
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    hits = relevant.gather(1, top).any(dim=1)
    return float(hits[counted].float().mean())


def retrieval_recall(image_features: Tensor, text_features: Tensor, relevant: Tensor,
                     ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """`i2t_r@k` and `t2i_r@k` for (N, D) images, (M, D) texts and a boolean (N, M) relevance matrix; cosine
    similarity ranks."""
    if relevant.shape != (image_features.shape[0], text_features.shape[0]):
        raise ValueError(f"relevance matrix of shape {tuple(relevant.shape)} for {image_features.shape[0]} images "
                         f"and {text_features.shape[0]} texts")
    scores = _normalize(image_features) @ _normalize(text_features).T
    relevant = relevant.bool()
    out = {}
    for k in ks:
        out[f"i2t_r@{k}"] = _hit_rate(scores, relevant, k)
        out[f"t2i_r@{k}"] = _hit_rate(scores.T, relevant.T, k)
    return out


def class_relevance(image_labels: Tensor, text_labels: Tensor) -> Tensor:
    """(N, M) bool: image i matches text j when they carry the same class id."""
    return image_labels.view(-1, 1) == text_labels.view(1, -1)


__all__ = ["class_relevance", "prompt_ensemble", "retrieval_recall", "zero_shot_metrics", "zero_shot_predictions"]
