"""Knowledge distillation on a pruned training set.

Ben-Baruch, Botach, Kviatkovsky, Aggarwal, Medioni (2024/2025), "Distilling the Knowledge in Data Pruning",
ICML 2025 (arXiv 2403.07854).

The method: keep a fraction f of the training records (at random, or by a difficulty score), and train the
student on them with

    L = (1 − α) · CE(y, p_S) + α · τ² · KL(softmax(z_T/τ) ‖ softmax(z_S/τ)),

the teacher being trained on the full data. Confirmed in the paper's abstract (stored copies searched): KD
from a full-data teacher helps at every pruning fraction, with KD random pruning matches or beats the
sophisticated pruning scores, and "the pruning factor and the optimal knowledge distillation weight" are
linked — the optimal α grows as the kept fraction shrinks (also methods-a §10).

Chosen here, not confirmed: the paper's α-per-fraction values were not in the stored copies that could be
searched, so `kd_weight_for_fraction` is a monotone rule of this module — α = 0.5 on the full data (the
common KD default), 0.9 at f = 10 % and below, linear in log10 f in between. `benchmarks/data_strategies.py`
(b) measures the best α per fraction on the digits; pass `alpha=` to override. τ = 4 is this module's
default (a common image-classification KD choice). Difficulty scores (for `keep="hardest"|"easiest"`) are the
caller's: higher = harder, e.g. EL2N (`el2n_scores`, Paul et al. 2021), forgetting counts, or the loss.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from potstill.errors import UserError, int_at_least
from potstill.losses import forward_kl

KEEP_RULES = ("random", "hardest", "easiest")
#: α at the full data (f = 1) and at f ≤ KD_WEIGHT_LOW_FRACTION; log-linear in between (module docstring).
KD_WEIGHT_FULL_DATA = 0.5
KD_WEIGHT_LOW_FRACTION_VALUE = 0.9
KD_WEIGHT_LOW_FRACTION = 0.1
DEFAULT_TEMPERATURE = 4.0
# Random stream tag of `prune_indices`.
_PRUNE_STREAM = 21


def _check_fraction(fraction: Any) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating, np.integer)):
        raise UserError(f"fraction (share of the records kept) must be a number in (0, 1], got {fraction!r}")
    f = float(fraction)
    if not 0 < f <= 1:
        raise UserError(f"fraction (share of the records kept) must be in (0, 1], got {fraction!r}")
    return f


def kept_count(n: int, fraction: float) -> int:
    """Records kept out of `n` at `fraction`: round(f · n), half up, at least 1."""
    return max(1, int(math.floor(_check_fraction(fraction) * n + 0.5)))


def prune_indices(n: int, fraction: float, *, scores: Any = None, keep: str = "random", seed: int = 0) -> np.ndarray:
    """Sorted indices of the `kept_count(n, fraction)` records kept.

    `keep="random"` (default): a uniform subset fixed by `seed`; `scores` must then be None.
    `keep="hardest"` / `"easiest"`: the records with the highest / lowest `scores` (length n, higher =
    harder); ties go to the lower index.
    """
    int_at_least("n (number of records)", n, 1)
    if keep not in KEEP_RULES:
        raise UserError(f"keep must be one of {KEEP_RULES}, got {keep!r}")
    size = kept_count(int(n), fraction)
    if keep == "random":
        if scores is not None:
            raise UserError('scores are only used with keep="hardest" or "easiest"; drop them for keep="random"')
        rng = np.random.default_rng((_PRUNE_STREAM, int(seed)))
        return np.sort(rng.choice(int(n), size=size, replace=False)).astype(np.int64)
    if scores is None:
        raise UserError(f'keep="{keep}" needs scores: one difficulty score per record, higher = harder')
    s = np.asarray(scores.detach().cpu().numpy() if hasattr(scores, "detach") else scores, dtype=np.float64)
    if s.shape != (n,) or not np.isfinite(s).all():
        raise UserError(f"scores must be {n} finite numbers (one per record), got shape {s.shape}")
    order = np.argsort(-s if keep == "hardest" else s, kind="stable")
    return np.sort(order[:size]).astype(np.int64)


def el2n_scores(probs: Any, labels: Any) -> np.ndarray:
    """EL2N difficulty ‖p − onehot(y)‖₂ per record (Paul, Ganguli, Dziugaite 2021), from class probabilities
    `(n, C)` (e.g. early-training or teacher predictions) and integer labels `(n,)`; higher = harder."""
    p = np.asarray(probs.detach().cpu().float().numpy() if hasattr(probs, "detach") else probs, dtype=np.float64)
    y = np.asarray(labels.detach().cpu().numpy() if hasattr(labels, "detach") else labels).astype(np.int64)
    if p.ndim != 2 or y.shape != (p.shape[0],) or (y < 0).any() or (y >= p.shape[1]).any():
        raise UserError(f"el2n_scores needs probs (n, C) and labels (n,) in [0, C), got {p.shape} and {y.shape}")
    diff = p.copy()
    diff[np.arange(y.size), y] -= 1.0
    return np.linalg.norm(diff, axis=1)


def kd_weight_for_fraction(fraction: float) -> float:
    """KD weight α for a kept fraction f: 0.9 for f ≤ 0.1, 0.5 at f = 1, linear in log10 f in between.

    Monotone non-increasing in f (the paper's finding: the smaller the kept set, the more the student should
    rely on the teacher); the anchor values are this module's choice (see the module docstring).
    """
    f = _check_fraction(fraction)
    if f <= KD_WEIGHT_LOW_FRACTION:
        return KD_WEIGHT_LOW_FRACTION_VALUE
    share = math.log10(f) / math.log10(KD_WEIGHT_LOW_FRACTION)  # 1 at the low fraction, 0 at f = 1
    return KD_WEIGHT_FULL_DATA + (KD_WEIGHT_LOW_FRACTION_VALUE - KD_WEIGHT_FULL_DATA) * share


def pruned_kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, fraction: float,
                   temperature: float = DEFAULT_TEMPERATURE, *, alpha: float | None = None) -> Tensor:
    """(1 − α) · CE(labels, z_S) + α · τ² · KL(softmax(z_T/τ) ‖ softmax(z_S/τ)), means over counted rows.

    `student_logits`, `teacher_logits`: `[..., C]`; `labels`: `[...]` ints, -100 = ignored (in both terms).
    α = `kd_weight_for_fraction(fraction)` unless `alpha` (in [0, 1]) is given. CE is taken at temperature
    1; the KL is `potstill.losses.forward_kl(..., temperature=τ, scale_t2=True)`. Float32 result.
    """
    f = _check_fraction(fraction)
    a = kd_weight_for_fraction(f) if alpha is None else float(alpha)
    if not 0 <= a <= 1:
        raise UserError(f"alpha (KD weight) must be in [0, 1], got {alpha!r}")
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:-1] != labels.shape:
        raise UserError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                        f"{tuple(teacher_logits.shape)} must match, and labels {tuple(labels.shape)} must be their "
                        "leading shape")
    flat = student_logits.reshape(-1, student_logits.shape[-1]).float()
    targets = labels.reshape(-1).long()
    ce = F.cross_entropy(flat, targets, ignore_index=-100) if (targets != -100).any() else flat.sum() * 0.0
    if a == 0:
        return ce
    kd = forward_kl(student_logits, teacher_logits, temperature=temperature, labels=labels, scale_t2=True)
    return (1 - a) * ce + a * kd
