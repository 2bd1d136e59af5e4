"""VL2V-ADiP's objective: pull a vision student's projected feature onto the teacher's image AND class-text vectors.

Addepalli et al. 2024, "Leveraging Vision-Language Models for Improving Domain Generalization in Image
Classification" (VL2V-ADiP: Align, Distil, Predict). A black-box CLIP-style teacher gives, for a labelled image
x of class y, its image embedding e_img(x) and the prompt-ensembled text embedding of the class, e_txt(y). The
student's backbone features φ_S(x) go through a linear projection W into the teacher's space:

    p = ℓ2n(W φ_S(x)),   L = −λ·cos(p, e_img(x)) − (1−λ)·cos(p, e_txt(y)),   mean over images

Stage 1 (align) trains W with the backbone frozen, stage 2 (distil) freezes W and trains the backbone (both with
this loss; `potstill.students.vl2v_adip`); the student predicts argmax_c ⟨p, ê_txt_c⟩. Default λ = 0.5 (the
paper's; its search grid is 0.1 … 0.9). Under CutMix/mixup the text term is label-mixed: with the mixed image's
two labels y_a, y_b and the share m of y_a, L = m·L(y_a) + (1−m)·L(y_b) (the official code's form; `mix`).

`vl2v_adip` is the objective form (catalogue kind "vision_language"): it reads the task's
`VisionLanguageSignal` of both sides (any object with `image` and `class_text`) and the batch's labels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._rows import reduce_counted


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12)


def vl2v_adip_loss(projected: Tensor, image_targets: Tensor, text_targets: Tensor, *, lam: float = 0.5,
                   text_targets_b: Tensor | None = None, mix: Tensor | float | None = None,
                   reduction: str = "mean") -> Tensor:
    """−λ·cos(p, e_img) − (1−λ)·cos(p, e_txt) per row of `projected` (N, D) (W φ_S(x); normalised here) against
    the teacher's `image_targets` (N, D) and the class text of each row's label `text_targets` (N, D). With
    `text_targets_b` and `mix` (a share m of the first label, scalar or (N,)): the text term is
    m·cos(p, e_txt(y_a)) + (1−m)·cos(p, e_txt(y_b))."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"vl2v_adip: lam must be in [0, 1], got {lam}")
    text = _cosine(projected, text_targets)
    if text_targets_b is not None:
        share = torch.as_tensor(1.0 if mix is None else mix, dtype=text.dtype, device=text.device)
        text = share * text + (1.0 - share) * _cosine(projected, text_targets_b)
    per_row = -lam * _cosine(projected, image_targets) - (1.0 - lam) * text
    return reduce_counted(per_row, None, reduction)


def vl2v_adip(student: Any, teacher: Any, *, labels: Tensor | None = None, lam: float = 0.5,
              mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """The objective on the vision_language task's signals: p = the student's `image` vectors, e_img = the
    teacher's, e_txt(y) = row y of the shared `class_text`; rows labelled < 0 (and `mask` False) are skipped."""
    if labels is None:
        raise ValueError("vl2v_adip needs gold labels (the class text of each image); the batch has none")
    keep = labels >= 0
    if mask is not None:
        keep = keep & mask.bool()
    class_text = teacher.class_text.to(student.image.device)
    per_row = vl2v_adip_loss(student.image, teacher.image, class_text[labels.clamp_min(0)], lam=lam,
                             reduction="none")
    return reduce_counted(per_row, keep, reduction)


vl2v_adip.batch_fields = {"labels": "labels"}  # type: ignore[attr-defined]  # what the loop passes from the batch
vl2v_adip.needs_labels = True  # type: ignore[attr-defined]  # the task refuses unlabelled training images

__all__ = ["vl2v_adip", "vl2v_adip_loss"]
