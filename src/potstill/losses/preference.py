"""Preference distillation: DPO with the frozen teacher as the reference model (LLaVA-MoD).

Shu et al. 2024, "LLaVA-MoD: Making LLaVA Tiny via MoE Knowledge Distillation", second stage. After the student
has imitated the teacher's token distributions, it is trained on preference pairs (x, y_w, y_l) with the DPO loss
of Rafailov et al. 2023, where the reference policy is not a frozen copy of the student but the teacher itself:

    r(y) = log π_s(y | x) − log π_t(y | x)                      (implicit reward, sequence log-probs)
    sigmoid:   L = −log σ(β · [r(y_w) − r(y_l)])
    kto_pair:  L = ½ · [1 − σ(β · (r(y_w) − KL_l))] + ½ · [1 − σ(β · (KL_w − r(y_l)))]

log π(y | x) is summed over the completion's tokens only. In `kto_pair` (the HALO/KTO paired form, the default of
LLaVA-MoD's training scripts, TRL's former `loss_type="kto_pair"`) KL_w and KL_l are the batch means of r(y_w)
and r(y_l), clamped at 0 and held constant (no gradient), the reference point of prospect theory. The two halves
are averaged so that a "mean" over pairs equals the mean over the 2B terms of the original.

Defaults: β = 0.1 (LLaVA-MoD), `loss_type="sigmoid"` (the paper's formula). With student = teacher every reward
is 0: the sigmoid loss is log 2 and the kto_pair loss ½.

Batch layout of `dpo_teacher_ref`: `[2B, T, V]` logits, the B chosen rows first, then the B rejected rows in the
same pair order; `labels[i, j]` is the token scored at position j of row i (the next token, already aligned with
the logits), -100 where the row does not count (prompt, padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "kto_pair")
_REDUCTIONS = ("mean", "sum", "none")


def sequence_logps(logits: Tensor, labels: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Σ_j log softmax(logits[i, j])[labels[i, j]] over the counted positions of each row: `[N, T, V]` logits,
    `[N, T]` labels (-100 = not counted), optional bool `mask` `[N, T]` (True = counted). Float32, shape `[N]`."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits [N, T, V] and labels [N, T], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be token ids (an integer tensor), got {labels.dtype}")
    counted = labels != -100
    if mask is not None:
        if mask.shape != labels.shape:
            raise ValueError(f"mask must have shape {tuple(labels.shape)}, got {tuple(mask.shape)}")
        counted = counted & mask.bool()
    log_probs = F.log_softmax(logits.float(), dim=-1)
    token = log_probs.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (token * counted).sum(-1)


def preference_loss(student_chosen: Tensor, student_rejected: Tensor, teacher_chosen: Tensor,
                    teacher_rejected: Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
                    reduction: str = "mean") -> Tensor:
    """The per-pair DPO loss from sequence log-probs `[B]` of the student and the reference (the teacher); see the
    module docstring for the formulas. The reference's log-probs are treated as constants."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    reward_chosen = student_chosen.float() - teacher_chosen.detach().float()
    reward_rejected = student_rejected.float() - teacher_rejected.detach().float()
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (reward_chosen - reward_rejected))
    else:
        kl_chosen = reward_chosen.detach().mean().clamp_min(0)
        kl_rejected = reward_rejected.detach().mean().clamp_min(0)
        losses = 0.5 * ((1 - torch.sigmoid(beta * (reward_chosen - kl_rejected)))
                        + (1 - torch.sigmoid(beta * (kl_chosen - reward_rejected))))
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()


def dpo_teacher_ref(student_logits: Tensor, teacher_logits: Tensor, *, labels: Tensor, mask: Tensor | None = None,
                    beta: float = 0.1, loss_type: str = "sigmoid", reduction: str = "mean") -> Tensor:
    """DPO with the teacher as reference on a pair batch (chosen rows, then rejected rows; module docstring).

    `reduction`: "mean" over pairs, "sum" over pairs, or "none" (`[B]`)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}")
    rows = student_logits.shape[0]
    if rows % 2:
        raise ValueError(f"a pair batch has an even number of rows (chosen, then rejected), got {rows}")
    student = sequence_logps(student_logits, labels, mask=mask)
    with torch.no_grad():
        teacher = sequence_logps(teacher_logits, labels, mask=mask)
    half = rows // 2
    return preference_loss(student[:half], student[half:], teacher[:half], teacher[half:], beta=beta,
                           loss_type=loss_type, reduction=reduction)
