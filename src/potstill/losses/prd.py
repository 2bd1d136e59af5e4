"""PRD's losses: supervised contrastive learning, class prototypes, and prototype–sample relation distillation.

Paper: Asadi, Davari, Mudur, Aljundi, Belilovsky, "Prototype-Sample Relation Distillation: Towards Replay-Free
Continual Learning" (ICML 2023).

A continual learner sees a stream of tasks (here: two new classes each) and keeps no old data. The backbone
gives features h; a projection head gives z for the contrastive loss; one prototype p_c per class lives in the
feature space, and prediction is the nearest prototype (largest cosine). With x̂ = x / ‖x‖:

- `supcon_loss` (Khosla et al. 2020): for each anchor i with at least one positive (another row of its class),
  `L_i = −1/|P(i)| · Σ_{p∈P(i)} log( exp(ẑ_i·ẑ_p/τ) / Σ_{a≠i} exp(ẑ_i·ẑ_a/τ) )`; averaged over those anchors.
  Two augmented views of a batch are simply its rows twice, the labels repeated.
- `prototype_loss`: `L_p = mean_i (1 − cos(p_{y_i}, sg h_i))`. The features are detached, so this term moves
  only the prototypes; there are no negatives.
- `prd_relation_kl`: for every old class c, the distribution of its prototype over the batch samples,
  `q_c(i) = softmax_i(⟨p̂_c, ĥ_i⟩ / τ)`, once with the frozen previous model's features and prototypes (old) and
  once with the current ones (new); `L_PRD = Σ_c KL(q_c^old ‖ q_c^new)`. It is 0 when neither the features nor
  the old prototypes moved. Gradients reach the new features and the new copies of the old prototypes.
- Task loss: `L = L_SupCon + λ_p·L_p + λ_d·L_PRD`.

Defaults (the paper's CIFAR-100 setting): SupCon τ 0.1, λ_p 2, λ_d 4, distillation τ 1, prototype lr 0.01.

Δ from the authors' code (naderAsadi/Probing-Continual-Learning, methods/repe.py): there the softmax runs over
each old task's prototypes for every sample (one distribution per sample, a cross-entropy averaged over the
samples), and the features are not normalised in the scores. `axis="prototypes"` gives that direction of the
softmax (with normalised features, and as a KL); `axis="samples"` (the default) is the paper's.

Reductions: `supcon_loss` and `prototype_loss` take "mean" (over counted anchors / rows), "sum" or "none" (per
row). `prd_relation_kl`'s rows are the old prototypes for `axis="samples"` and the samples for
`axis="prototypes"`; "sum" (the default) is the paper's Σ_c, "mean" divides by the number of rows (the code's
average over samples). Computed in float32.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ._rows import check_reduction, check_temperature

RelationAxis = Literal["samples", "prototypes"]
RELATION_AXES = ("samples", "prototypes")


def _reduce(rows: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / max(rows.numel(), 1)


def _check_rows(features: Tensor, labels: Tensor, what: str) -> None:
    if features.dim() != 2:
        raise ValueError(f"{what} must be (N, D), got shape {tuple(features.shape)}")
    if labels.shape != features.shape[:1]:
        raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}")


def supcon_loss(features: Tensor, labels: Tensor, *, temperature: float = 0.1, reduction: str = "mean") -> Tensor:
    """Supervised contrastive loss of `features` (N, D) (L2-normalised here) with class `labels` (N,).

    Anchors without a positive in the batch add nothing ("none" gives them 0; "mean" counts only the others).
    """
    _check_rows(features, labels, "features")
    check_reduction(reduction)
    temperature = check_temperature(temperature)
    z = F.normalize(features.float(), dim=-1)
    n = z.shape[0]
    self_pair = torch.eye(n, dtype=torch.bool, device=z.device)
    sims = (z @ z.T / temperature).masked_fill(self_pair, float("-inf"))
    log_prob = sims - torch.logsumexp(sims, dim=1, keepdim=True)
    positives = (labels.view(-1, 1) == labels.view(1, -1)).to(z.device) & ~self_pair
    counts = positives.sum(1)
    per_anchor = -log_prob.masked_fill(~positives, 0.0).sum(1) / counts.clamp(min=1)
    if reduction == "mean":
        has_positive = counts > 0
        return per_anchor[has_positive].sum() / max(int(has_positive.sum()), 1)
    return _reduce(per_anchor, reduction)


def prototype_loss(features: Tensor, prototypes: Tensor, labels: Tensor, *, reduction: str = "mean") -> Tensor:
    """`1 − cos(p_{y_i}, sg h_i)` per row: `features` (N, D) are detached, `prototypes` (C, D) get the gradient."""
    _check_rows(features, labels, "features")
    check_reduction(reduction)
    if prototypes.dim() != 2 or prototypes.shape[1] != features.shape[1]:
        raise ValueError(f"prototypes must be (C, {features.shape[1]}), got shape {tuple(prototypes.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= prototypes.shape[0]):
        raise ValueError(f"labels must be class ids in 0..{prototypes.shape[0] - 1}")
    cos = F.cosine_similarity(prototypes.float()[labels], features.detach().float(), dim=-1)
    return _reduce(1.0 - cos, reduction)


def prototype_scores(features: Tensor, prototypes: Tensor, *, temperature: float = 1.0) -> Tensor:
    """`⟨ĥ_i, p̂_c⟩ / τ`: (N, C) cosine scores of features (N, D) against prototypes (C, D)."""
    return F.normalize(features.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T / temperature


def prd_relation_kl(new_features: Tensor, old_features: Tensor, new_prototypes: Tensor, old_prototypes: Tensor,
                    *, temperature: float = 1.0, axis: RelationAxis = "samples", reduction: str = "sum") -> Tensor:
    """`Σ_c KL(q_c^old ‖ q_c^new)`: how the old prototypes (C, D) relate to the batch (N, D), kept as it was.

    `old_features` / `old_prototypes` come from the frozen previous model (no gradient is taken through them);
    `new_prototypes` are the current values of the same C old classes. `axis` picks the softmax's axis: over
    the samples for each prototype (the paper) or over the prototypes for each sample (the authors' code).
    """
    check_reduction(reduction)
    temperature = check_temperature(temperature)
    if axis not in RELATION_AXES:
        raise ValueError(f"axis must be one of {RELATION_AXES}, got {axis!r}")
    if new_features.shape != old_features.shape or new_features.dim() != 2:
        raise ValueError(f"new and old features must both be (N, D), got {tuple(new_features.shape)} and "
                         f"{tuple(old_features.shape)}")
    if new_prototypes.shape != old_prototypes.shape or new_prototypes.shape[-1] != new_features.shape[-1]:
        raise ValueError(f"new and old prototypes must both be (C, {new_features.shape[-1]}), got "
                         f"{tuple(new_prototypes.shape)} and {tuple(old_prototypes.shape)}")
    dim = 0 if axis == "samples" else 1  # scores are (N samples, C prototypes)
    old_log_q = torch.log_softmax(prototype_scores(old_features.detach(), old_prototypes.detach(),
                                                   temperature=temperature), dim=dim)
    new_log_q = torch.log_softmax(prototype_scores(new_features, new_prototypes, temperature=temperature), dim=dim)
    per_row = (old_log_q.exp() * (old_log_q - new_log_q)).sum(dim)
    return _reduce(per_row, reduction)
