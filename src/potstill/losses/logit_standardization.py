"""Logit-standardised KD: z-score each row of logits before the temperature, for teacher and student alike.

Sun et al. 2024, "Logit Standardization in Knowledge Distillation" (CVPR). Plain KD with one shared temperature
asks the student to match the teacher's logits up to a shift, so a small student must also copy the teacher's
logit *range*; a confident teacher (logit gaps of tens of units) then gives near one-hot targets at any usual T.
The paper divides each row by its own spread first:

    Z(z) = (z − mean(z)) / (std(z) + ε),   L = KL(softmax(Z(z_t)/T) ‖ softmax(Z(z_s)/T))

so only the *relation* between the classes is matched, and T becomes a "base" temperature on a unit scale.
The paper presents Z as a pre-process for any logit-based KD loss; `logit_std_js` is the same pre-process before
SSLD's Jensen-Shannon divergence (Cui et al. 2021), which needs no labels, so it can also run on an unlabelled pool:

    L_JS = ½·KL(p_t ‖ m) + ½·KL(p_s ‖ m),   p = softmax(Z(z)/T),   m = (p_t + p_s) / 2
std is the Bessel-corrected sample standard deviation over the class axis, ε = 1e-7 (the authors' code and
torchdistill's `LogitStdKDLoss`). Defaults: temperature=2.0 (a base temperature: on z-scored logits T = 1 already
gives soft targets), reduction="mean", scale_t2=False (the usual T² factor is the separate flag, as everywhere in
potstill). Rows with one class (std undefined) are not meaningful here and are refused.
"""

from __future__ import annotations

from torch import Tensor

from ._rows import check_same_shape
from .divergences import forward_kl, js_divergence

STD_EPS = 1e-7


def standardize_logits(logits: Tensor, eps: float = STD_EPS) -> Tensor:
    """Each row of `logits` [..., C] minus its mean, divided by (its sample std + eps), in float32."""
    if logits.shape[-1] < 2:
        raise ValueError(f"logit standardisation needs at least 2 classes, got logits of shape {tuple(logits.shape)}")
    z = logits.float()
    return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + eps)


def logit_std_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 2.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = False,
) -> Tensor:
    """KL(softmax(Z(z_t)/T) ‖ softmax(Z(z_s)/T)) with Z the per-row z-score (Sun et al. 2024); see the module.

    Defaults: temperature=2.0, reduction="mean", scale_t2=False.
    """
    check_same_shape(student_logits, teacher_logits)
    return forward_kl(standardize_logits(student_logits), standardize_logits(teacher_logits),
                      temperature=temperature, mask=mask, labels=labels, reduction=reduction, scale_t2=scale_t2)


def logit_std_js(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 2.0,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = False,
) -> Tensor:
    """½·KL(p_t ‖ m) + ½·KL(p_s ‖ m), p = softmax(Z(z)/T), m = (p_t + p_s)/2: SSLD's JS on z-scored logits.

    Defaults: temperature=2.0, reduction="mean", scale_t2=False.
    """
    check_same_shape(student_logits, teacher_logits)
    return js_divergence(standardize_logits(student_logits), standardize_logits(teacher_logits),
                         temperature=temperature, mask=mask, labels=labels, reduction=reduction, scale_t2=scale_t2)
