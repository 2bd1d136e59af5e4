"""DisWOT: a training-free score of a candidate student against its teacher, from one labelled batch.

Paper: Dong et al., CVPR 2023, "DisWOT: Student Architecture Search for Distillation WithOut Training". A candidate
whose Gram matrices already look like the teacher's at initialisation is predicted to distil well; the search
keeps the candidate with the highest score. Two terms, on features F (B × D, one row per example):

- relation: G = rownorm(F Fᵀ) (B × B, each row scaled to unit L2 norm), d_rel = ‖G_T − G_S‖²_F / B²;
- semantic: M = ∂CE(F Wᵀ, y)/∂W (C × D, the gradient of a linear classifier's cross-entropy with respect to its
  weights, the paper's Grad-CAM surrogate), G_sem = rownorm(M Mᵀ) (C × C), d_sem = ‖G_sem,T − G_sem,S‖²_F / C;
- score = −(d_sem + d_rel): 0 for a student identical to the teacher, the maximum.

The C × C Gram compares students of any width with the teacher (`form="gram"`, the default). The official code
instead treats the C rows of M as C samples and compares their D × D outer products m_c m_cᵀ
(inter-channel correlation, ICKD): d_sem = Σ_c ‖m_c,T m_c,Tᵀ − m_c,S m_c,Sᵀ‖²_F / C, which needs equal widths
(`form="code"`).

Here F is the mean-pooled (or CLS) last hidden state of a text encoder or LM, and the linear head is zero unless
one is given: then M = (1/C − Y)ᵀ F / B, the batch's class-centred feature sums, with no random draw (the paper's
CNNs bring their own freshly initialised fc layer; a pooled encoder has none). M is computed in closed form, so no
backward pass is needed. Defaults: one batch (the paper uses 64 labelled examples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Form = Literal["gram", "code"]


@dataclass(frozen=True)
class DisWOTScore:
    score: float
    semantic: float
    relation: float

    def to_dict(self) -> dict[str, float]:
        return {"score": self.score, "semantic": self.semantic, "relation": self.relation}


def relation_gram(features: torch.Tensor) -> torch.Tensor:
    """rownorm(F Fᵀ) of B × D features (flattened beyond the first axis)."""
    f = features.flatten(1).double()
    return F.normalize(f @ f.T, dim=1)


def classifier_gradient(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        head: torch.Tensor | None = None) -> torch.Tensor:
    """∂CE(F Wᵀ, y)/∂W (C × D), mean over the batch; W = `head` (C × D) or zero."""
    f = features.flatten(1).double()
    logits = f @ head.double().T if head is not None else f.new_zeros(len(f), num_classes)
    residual = logits.softmax(-1) - F.one_hot(labels.long(), num_classes).double()
    return residual.T @ f / len(f)


def semantic_distance(m_teacher: torch.Tensor, m_student: torch.Tensor, form: Form = "gram") -> torch.Tensor:
    c = m_teacher.shape[0]
    if form == "gram":
        g_t, g_s = F.normalize(m_teacher @ m_teacher.T, dim=1), F.normalize(m_student @ m_student.T, dim=1)
        return (g_t - g_s).pow(2).sum() / c
    if form == "code":
        if m_teacher.shape != m_student.shape:
            raise ValueError(f"DisWOT form 'code' compares D × D channel correlations and needs equal widths; "
                             f"teacher {m_teacher.shape[1]}, student {m_student.shape[1]}: use form 'gram'")
        outer_t = m_teacher[:, :, None] * m_teacher[:, None, :]
        outer_s = m_student[:, :, None] * m_student[:, None, :]
        return (outer_t - outer_s).pow(2).sum() / c
    raise ValueError(f"DisWOT form must be 'gram' or 'code', got {form!r}")


def diswot_from_features(teacher: torch.Tensor, student: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                         form: Form = "gram", teacher_head: torch.Tensor | None = None,
                         student_head: torch.Tensor | None = None) -> DisWOTScore:
    """The DisWOT score of student features (B × D_S) against teacher features (B × D_T) with class `labels`."""
    if teacher.shape[0] != student.shape[0] or teacher.shape[0] != labels.shape[0]:
        raise ValueError(f"DisWOT needs one row per example in both models and the labels, got "
                         f"{teacher.shape[0]}, {student.shape[0]} and {labels.shape[0]}")
    b = teacher.shape[0]
    d_rel = (relation_gram(teacher) - relation_gram(student)).pow(2).sum() / b**2
    d_sem = semantic_distance(classifier_gradient(teacher, labels, num_classes, teacher_head),
                              classifier_gradient(student, labels, num_classes, student_head), form)
    return DisWOTScore(-float(d_sem + d_rel), float(d_sem), float(d_rel))


def pooled_features(model: nn.Module, batch: dict[str, torch.Tensor], pooling: str = "mean") -> torch.Tensor:
    """The last hidden state of a Hugging Face model on `batch`, mean-pooled over real tokens or its first token."""
    with torch.no_grad():
        out: Any = model(**batch, output_hidden_states=True)
    hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) else out.last_hidden_state
    if pooling == "cls":
        return hidden[:, 0].float()
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float()


def diswot_score(teacher: nn.Module, student: nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor,
                 num_classes: int, *, form: Form = "gram", pooling: str = "mean") -> DisWOTScore:
    """Score a candidate student at initialisation against the teacher on one labelled, tokenised batch."""
    was = teacher.training, student.training
    teacher.eval()
    student.eval()
    try:
        return diswot_from_features(pooled_features(teacher, batch, pooling), pooled_features(student, batch, pooling),
                                    labels, num_classes, form=form)
    finally:
        teacher.train(was[0])
        student.train(was[1])
