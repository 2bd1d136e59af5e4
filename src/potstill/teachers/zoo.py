"""Choosing teachers from a model zoo by task similarity: DistillNearest and DistillWeighted.

Borup, Phoo & Hariharan 2023, "Distilling from Similar Tasks for Transfer Learning on a Budget" (ICCV). With a
few labelled target examples L, unlabelled target data U and a zoo of frozen source extractors φ_s (no source
data), each source is scored by how well its features fit the target task, measured on L:

- `probe_score`: the cross-validated accuracy of a logistic-regression head on φ_s(L) (the default);
- `h_score`: tr(cov(f)⁻¹ · cov(E[f | y])) (Bao et al. 2019), a closed-form transferability estimate that
  needs no training; larger means the class means of φ_s are far apart relative to its spread.

Then a target head h_s is fit on φ_s(L) for each source, and the student learns from h_s(φ_s(u)) on U:
- **DistillNearest**: the single best-scoring source, s* = argmax a_s (`nearest`);
- **DistillWeighted**: every source, with weights w = softmax(a / T) (`similarity_weights`); the student has
  one head per source and minimises Σ_s w_s · KL(h_s(φ_s(u)) ‖ student_s(u))
  (`potstill.losses.multi_teacher.weighted_multi_teacher_kl`) plus cross-entropy on L.
The paper compares several task-similarity metrics; the probe accuracy is the one used here by default, the
weight temperature is a parameter (default 0.1 on accuracies in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from potstill.errors import UserError

FeatureFn = Callable[[Tensor], Tensor]


def _as_numpy(features: Tensor | np.ndarray) -> np.ndarray:
    return features.detach().double().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features, float)


def h_score(features: Tensor | np.ndarray, labels: Sequence[int] | np.ndarray, *, ridge: float = 1e-6) -> float:
    """H-score of features f (n, d) for labels y: tr(cov(f)⁻¹ cov(E[f|y])), with covariances over the n rows
    (divided by n) and a small `ridge` on cov(f)'s diagonal so that rank-deficient features stay finite."""
    f = _as_numpy(features)
    y = np.asarray(labels)
    if f.ndim != 2 or len(f) != len(y) or len(f) < 2:
        raise UserError(f"h_score needs (n, d) features and n labels with n ≥ 2, got {f.shape} and {len(y)} labels")
    f = f - f.mean(0, keepdims=True)
    cov_f = f.T @ f / len(f) + ridge * np.eye(f.shape[1])
    class_means = np.zeros_like(f)
    for label in np.unique(y):
        rows = y == label
        class_means[rows] = f[rows].mean(0)
    cov_g = class_means.T @ class_means / len(f)
    return float(np.trace(np.linalg.solve(cov_f, cov_g)))


def _probe() -> Any:
    """The head every source gets: logistic regression on standardised features (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))


def probe_score(features: Tensor | np.ndarray, labels: Sequence[int] | np.ndarray, *, folds: int = 5,
                seed: int = 0) -> float:
    """Mean accuracy of a logistic-regression probe on standardised features over stratified `folds`."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    y = np.asarray(labels)
    smallest = int(np.bincount(np.unique(y, return_inverse=True)[1]).min())
    if smallest < 2:
        raise UserError("probe_score needs at least 2 labelled examples of every class")
    splits = StratifiedKFold(n_splits=min(folds, smallest), shuffle=True, random_state=seed)
    return float(cross_val_score(_probe(), _as_numpy(features), y, cv=splits).mean())


def similarity_weights(scores: Sequence[float] | Tensor, *, temperature: float = 0.1) -> Tensor:
    """DistillWeighted's source weights, softmax(a / T): T → 0 is DistillNearest, T → ∞ a plain average."""
    if temperature <= 0:
        raise UserError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(torch.as_tensor(scores, dtype=torch.float64) / temperature, dim=0).float()


def nearest(scores: Sequence[float] | Tensor) -> int:
    """DistillNearest: the index of the best-scoring source (the first on ties)."""
    return int(torch.as_tensor(scores, dtype=torch.float64).argmax())


@dataclass
class ZooSource:
    """One source model of the zoo: a name, its frozen feature extractor, and (once fit) its target head."""

    name: str
    features: FeatureFn
    head: Callable[[np.ndarray], np.ndarray] | None = None

    def fit_head(self, x_labelled: Tensor, y_labelled: Sequence[int]) -> None:
        """Fit the target head h_s: logistic regression on standardised φ_s(L)."""
        probe = _probe()
        probe.fit(_as_numpy(self.features(x_labelled)), np.asarray(y_labelled))
        self.head = probe.decision_function

    @torch.no_grad()
    def teacher_logits(self, x: Tensor) -> Tensor:
        """h_s(φ_s(x)): this source's logits over the target classes (needs `fit_head` first)."""
        if self.head is None:
            raise RuntimeError(f"source {self.name!r}: call fit_head before teacher_logits")
        return torch.as_tensor(self.head(_as_numpy(self.features(x))), dtype=torch.float32)


def score_sources(sources: Sequence[ZooSource], x_labelled: Tensor, y_labelled: Sequence[int], *,
                  metric: str = "probe", seed: int = 0) -> list[float]:
    """Each source's task-similarity score on the labelled target set (`metric`: probe or h_score)."""
    if metric not in ("probe", "h_score"):
        raise UserError(f"metric must be probe or h_score, got {metric!r}")
    scores = []
    for source in sources:
        with torch.no_grad():
            feats = source.features(x_labelled)
        scores.append(probe_score(feats, y_labelled, seed=seed) if metric == "probe" else h_score(feats, y_labelled))
    return scores
