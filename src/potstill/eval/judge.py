"""How well a judge's scores rank responses: Self-J's uses of a judge (Ye & Ng 2024) as metrics.

For scores s_i of N responses (higher = better):
- `spearman` / `pearson`: rank / linear correlation of s with a true quality q_i (0 when s or q is constant: a
  constant score ranks nothing);
- `best_of_n_acc`: per group of responses to one instruction, whether the best-scored one (the first on ties) is
  correct, averaged over groups: best-of-n reranking;
- `selective_acc_50`: accuracy of the ⌊N/2⌋ responses scored highest (stable order on ties): selective
  instruction following at 50 % abstention;
- `spearman_vs_label`: rank correlation with another score of the same responses (e.g. the reference-based
  label the judge learns), the yardstick Self-J reports;
- `mean_score`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _correlations(scores: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    from scipy.stats import pearsonr, spearmanr

    if len(scores) < 2 or np.ptp(scores) == 0 or np.ptp(other) == 0:
        return 0.0, 0.0
    return float(spearmanr(scores, other)[0]), float(pearsonr(scores, other)[0])


def best_of_n_accuracy(scores: np.ndarray, correct: np.ndarray, groups: Sequence[object]) -> float:
    """Mean over groups of `correct` at the group's best-scored response (the first one on ties)."""
    from potstill.students.self_judge import best_of_n

    best = best_of_n(scores.tolist(), list(groups))
    return float(np.mean([correct[i] for i in best.values()])) if best else 0.0


def judge_metrics(scores: Sequence[float] | np.ndarray, *, quality: Sequence[float] | None = None,
                  correct: Sequence[bool] | None = None, groups: Sequence[object] | None = None,
                  labels: Sequence[float] | None = None) -> dict[str, float]:
    """The metrics of the module docstring that the given columns allow (each column one value per score)."""
    s = np.asarray(scores, dtype=np.float64)
    for name, column in (("quality", quality), ("correct", correct), ("groups", groups), ("labels", labels)):
        if column is not None and len(column) != len(s):
            raise ValueError(f"judge_metrics: {len(s)} scores but {len(column)} values of {name}")
    out = {"mean_score": float(s.mean()) if len(s) else 0.0}
    if quality is not None:
        out["spearman"], out["pearson"] = _correlations(s, np.asarray(quality, dtype=np.float64))
    if correct is not None:
        right = np.asarray(correct, dtype=np.float64)
        keep = np.argsort(-s, kind="stable")[: len(s) // 2]
        out["selective_acc_50"] = float(right[keep].mean()) if len(keep) else 0.0
        if groups is not None:
            out["best_of_n_acc"] = best_of_n_accuracy(s, right, groups)
    if labels is not None:
        out["spearman_vs_label"] = _correlations(s, np.asarray(labels, dtype=np.float64))[0]
    return out
