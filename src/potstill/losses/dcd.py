"""DCD: dynamic contrastive distillation of a teacher's image–text matching scores.

Paper: Rao, Ding, Qi, Fang, Liu, Shen, Tao, "Dynamic Contrastive Distillation for Image-Text Retrieval"
(IEEE Transactions on Multimedia 2023).

Each image (a row) comes with candidate texts: its positive first, then K negatives, which DCD takes as the K
candidates the teacher scores highest among N random ones (`potstill.data.hard_negatives`). Teacher scores t and
student scores s are (B, 1 + K). Per row i, with p_i = softmax(t_i) over the candidates:

- teacher entropy share: e_i = Σ_k p_ik log p_ik (≤ 0), ê_i = e_i / Σ_j e_j (the shares sum to 1 over the batch);
- distillation weights: w = softmax over the batch of (1 − ê_i)², so rows where the teacher is sure (small
  |e_i|) weigh more;
- L_kd = T² Σ_i w_i · MSE_i, MSE_i = mean_k (t_ik / T − s_ik / T)²;
- L_ce = Σ_i ê_i · BCE_i, BCE_i = mean_k BCE(σ(s_ik), y_k) with y = [1, 0, …, 0], so rows where the teacher is
  unsure lean on the labels;
- L = α L_kd + (1 − α) L_ce.

Defaults (the paper's): α = 0.2, T = 1, K = 7. Gradients reach the student only: the teacher scores and the
weights derived from them are constants. `dynamic=False` replaces w and ê by 1/B (the same MSE + BCE without
the entropy weighting, the ablation baseline).

Δ from the authors' code (raojay7/DCD, meter/modules/KD_loss.py `distillation_loss`): there `F.mse_loss`
averages over the whole batch to one scalar before it is multiplied by w, and w sums to 1, so L_kd is the plain
batch MSE and the dynamic weighting of the distillation term does nothing. Here MSE is per row, as the paper's
formula reads. The code's mining (objectives.py, `compute_irtr`) also gathers the teacher's scores in teacher
rank order while the student's row is [positive, negatives]; the two differ whenever the teacher ranks a
negative above the positive. Here both rows are [positive, negatives] in the same order.

`dcd_logits` is the same loss on (B, C) class logits with gold labels (`task: vision_language`): the positive is
the label's column and the negatives are the K other columns the teacher scores highest.

Reductions: the paper's L is already a weighted average over the batch. To keep the library's convention
(`"mean"` = `"sum"` / counted rows), row i's value is B·(α T² w_i MSE_i + (1 − α) ê_i BCE_i) (`"none"`), so
`"sum"` is B·L and `"mean"` is L. `mask` (B,) drops rows (they take no share of w or ê). Float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._rows import check_reduction, check_temperature, check_weight


def _check_scores(student_scores: Tensor, teacher_scores: Tensor) -> None:
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(f"student and teacher scores must have the same shape, got student "
                         f"{tuple(student_scores.shape)} and teacher {tuple(teacher_scores.shape)}")
    if student_scores.dim() != 2 or student_scores.shape[1] < 2:
        raise ValueError(f"DCD scores must have shape (B, 1 + K) with the positive first and K ≥ 1 negatives, got "
                         f"{tuple(student_scores.shape)}")


def _row_mask(mask: Tensor | None, rows: int, device: torch.device) -> Tensor:
    if mask is None:
        return torch.ones(rows, dtype=torch.bool, device=device)
    if mask.shape != (rows,) or mask.is_floating_point():
        raise ValueError(f"mask must be a bool tensor of shape ({rows},), got {mask.dtype} {tuple(mask.shape)}")
    return mask.to(device=device, dtype=torch.bool)


def dcd_weights(teacher_scores: Tensor, *, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(ê, w) of the (B, 1 + K) teacher scores: the entropy shares ê_i = e_i / Σ_j e_j and the distillation
    weights w = softmax_batch((1 − ê)²), both (B,), zero on masked rows and summing to 1 over the others. When
    every counted row has zero entropy, ê is uniform."""
    t = teacher_scores.detach().float()
    counted = _row_mask(mask, t.shape[0], t.device)
    log_p = t.log_softmax(dim=-1)
    entropy = (log_p.exp() * log_p).sum(dim=-1).masked_fill(~counted, 0.0)  # e_i ≤ 0
    total = entropy.sum()
    n = counted.sum().clamp_min(1)
    if bool(total < -1e-12):
        share = entropy / total
    else:
        share = counted.float() / n
    weights = ((1.0 - share).square()).masked_fill(~counted, float("-inf")).softmax(dim=0)
    return share, torch.nan_to_num(weights, nan=0.0)


def dcd_loss(
    student_scores: Tensor,
    teacher_scores: Tensor,
    *,
    alpha: float = 0.2,
    temperature: float = 1.0,
    dynamic: bool = True,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """DCD's loss α T² Σ_i w_i MSE_i + (1 − α) Σ_i ê_i BCE_i of (B, 1 + K) scores, the positive in column 0.

    See the module docstring for w, ê, the reductions and the difference from the authors' code.
    Defaults: alpha=0.2, temperature=1.0, dynamic=True, reduction="mean".
    """
    check_reduction(reduction)
    _check_scores(student_scores, teacher_scores)
    alpha = check_weight("alpha", alpha)
    temperature = check_temperature(temperature)
    s, t = student_scores.float(), teacher_scores.detach().float()
    counted = _row_mask(mask, s.shape[0], s.device)
    n = int(counted.sum())
    if dynamic:
        share, weights = dcd_weights(t, mask=counted)
    else:
        share = weights = counted.float() / max(n, 1)
    mse = ((t - s) / temperature).square().mean(dim=-1)
    target = torch.zeros_like(s)
    target[:, 0] = 1.0
    bce = F.binary_cross_entropy_with_logits(s, target, reduction="none").mean(dim=-1)
    rows = n * (alpha * temperature**2 * weights * mse + (1.0 - alpha) * share * bce)
    rows = rows.masked_fill(~counted, 0.0)
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / n if reduction == "mean" and n > 0 else total


def dcd_logits(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    labels: Tensor | None = None,
    negatives: int = 7,
    alpha: float = 0.2,
    temperature: float = 1.0,
    dynamic: bool = True,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """`dcd_loss` on (B, C) image-to-class-text logits (`task: vision_language`'s zero-shot logits), the gold
    class the positive: each row keeps [its label, the `negatives` other classes the teacher scores highest]
    (every other class is a candidate, N = C − 1). Rows labelled < 0 are not counted. The training loop passes
    the batch's `labels`. Defaults: negatives=7, alpha=0.2, temperature=1.0, dynamic=True, reduction="mean".
    """
    if labels is None:
        raise ValueError("dcd_logits needs the images' gold labels (the positive class of each row)")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"dcd_logits: expected (B, C) student and teacher logits of one shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    classes = student_logits.shape[1]
    if not 1 <= negatives <= classes - 1:
        raise ValueError(f"dcd_logits: negatives must be in [1, {classes - 1}] for {classes} classes, got {negatives}")
    labels = labels.to(student_logits.device).long()
    counted = labels >= 0
    if mask is not None:
        counted = counted & _row_mask(mask, labels.shape[0], labels.device)
    positive = labels.clamp_min(0).view(-1, 1)
    t = teacher_logits.detach().float()
    others = t.scatter(1, positive, float("-inf"))
    lists = torch.cat([positive, others.topk(negatives, dim=1).indices], dim=1)
    return dcd_loss(student_logits.gather(1, lists), t.gather(1, lists), alpha=alpha, temperature=temperature,
                    dynamic=dynamic, mask=counted, reduction=reduction)


dcd_logits.batch_fields = {"labels": "labels"}  # type: ignore[attr-defined]  # the loop passes batch["labels"]

__all__ = ["dcd_logits", "dcd_loss", "dcd_weights"]
