"""The losses of "Distilling Large Vision-Language Model with Out-of-Distribution Generalizability".

Li, Fang, Liu, Ling, Tu and Su, ICCV 2023 (code: xuanlinli17/large_vlm_distillation_ood, `main_experiments.py`
`train`). A vision student distilled from a CLIP-style teacher generalises better to unseen classes and styles
when it follows two principles:

1. imitate the teacher's visual space, and keep the vision–language coherence of the teacher;
2. enrich the label text with attributes (`potstill.data.vision_language.CLASS_DESCRIPTIONS`, averaged over
   several descriptions per class with the caption templates; recipe field `vision_language.descriptions`).

With s = ℓ2n(student image vector), v = ℓ2n(teacher image vector), t_c the unit class text features and the
temperature τ (default 0.07, the paper's):

- visual imitation, MSE (`vlm_ood_visual_mse`, the paper's L-mse):   ‖s − v‖² summed over the dimensions;
- visual imitation, contrastive (`vlm_ood_visual_contrastive`, L-im-cst): InfoNCE of s_i against the batch's
  teacher vectors with v_i positive, averaged with the transposed direction (`bidirectional`, the default);
- vision–language coherence (`vlm_ood_coherence`, L-vlalign): KL(softmax(z_T) ‖ softmax(z_S)) with
  z = ⟨·, t_c⟩/τ over the teacher's top-k classes (k = `top_k`, all classes when None; the paper's k is 256), on
  the images whose teacher prediction equals their label (`filter_misaligned`, the paper's
  `--clip-filter-out-wrong-alignment`);
- label classification on the text (`vlm_ood_label_ce`, L-cls): cross-entropy of ⟨s, t_c⟩/τ with the gold label.

The paper's full objective is the unweighted sum of the four. Each objective reads the vision_language task's
`VisionLanguageSignal` of both sides (anything with `image` and `class_text`) and, where named, the labels.
The loop divides every sum by the batch's images, so the coherence term counts filtered rows as zero where the
official code averages over the kept rows only (the same up to the share of rows kept).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._rows import check_temperature, reduce_counted


def _unit(x: Tensor) -> Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def visual_mse(student_image: Tensor, teacher_image: Tensor) -> Tensor:
    """(N,) ‖ℓ2n(s) − ℓ2n(v)‖² per image (= 2 − 2·cos)."""
    return (_unit(student_image) - _unit(teacher_image)).pow(2).sum(-1)


def visual_contrastive(student_image: Tensor, teacher_image: Tensor, *, temperature: float = 0.07,
                       bidirectional: bool = True) -> Tensor:
    """(N,) InfoNCE per image: −log softmax_j(⟨s_i, v_j⟩/τ)[i], averaged with −log softmax_j(⟨s_j, v_i⟩/τ)[i]
    when `bidirectional`."""
    scores = _unit(student_image) @ _unit(teacher_image).T / check_temperature(temperature)
    target = torch.arange(scores.shape[0], device=scores.device)
    forward = torch.nn.functional.cross_entropy(scores, target, reduction="none")
    if not bidirectional:
        return forward
    return 0.5 * (forward + torch.nn.functional.cross_entropy(scores.T, target, reduction="none"))


def coherence(student_image: Tensor, teacher_image: Tensor, class_text: Tensor, *, temperature: float = 0.07,
              top_k: int | None = None) -> Tensor:
    """(N,) KL(softmax(z_T) ‖ softmax(z_S)) over each image's teacher top-k classes, z = ⟨ℓ2n(·), t_c⟩/τ."""
    tau = check_temperature(temperature)
    text = _unit(class_text)
    z_s, z_t = _unit(student_image) @ text.T / tau, _unit(teacher_image) @ text.T / tau
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"vlm_ood_coherence: top_k must be ≥ 1, got {top_k}")
        z_t, ids = z_t.topk(min(top_k, z_t.shape[-1]), dim=-1)
        z_s = z_s.gather(-1, ids)
    log_t, log_s = z_t.log_softmax(-1), z_s.log_softmax(-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


def label_text_ce(student_image: Tensor, class_text: Tensor, labels: Tensor, *, temperature: float = 0.07) -> Tensor:
    """(N,) cross-entropy of ⟨ℓ2n(s), t_c⟩/τ with the label (rows labelled < 0 give 0)."""
    logits = _unit(student_image) @ _unit(class_text).T / check_temperature(temperature)
    return torch.nn.functional.cross_entropy(logits, labels.clamp_min(0), reduction="none") * (labels >= 0)


def _keep(mask: Tensor | None, labels: Tensor | None = None) -> Tensor | None:
    keep = None if labels is None else labels >= 0
    if mask is not None:
        keep = mask.bool() if keep is None else keep & mask.bool()
    return keep


def _needs_labels(name: str, labels: Tensor | None) -> Tensor:
    if labels is None:
        raise ValueError(f"{name} needs gold labels; the batch has none")
    return labels


def vlm_ood_visual_mse(student: Any, teacher: Any, *, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """L-mse on the two sides' `image` vectors."""
    return reduce_counted(visual_mse(student.image, teacher.image), _keep(mask), reduction)


def vlm_ood_visual_contrastive(student: Any, teacher: Any, *, temperature: float = 0.07, bidirectional: bool = True,
                               mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """L-im-cst on the two sides' `image` vectors (in-batch negatives)."""
    per_row = visual_contrastive(student.image, teacher.image, temperature=temperature, bidirectional=bidirectional)
    return reduce_counted(per_row, _keep(mask), reduction)


def vlm_ood_coherence(student: Any, teacher: Any, *, labels: Tensor | None = None, temperature: float = 0.07,
                      top_k: int | None = None, filter_misaligned: bool = True, mask: Tensor | None = None,
                      reduction: str = "mean") -> Tensor:
    """L-vlalign over the shared `class_text`; with labels and `filter_misaligned`, only the images the teacher
    classifies correctly count."""
    text = teacher.class_text.to(student.image.device)
    per_row = coherence(student.image, teacher.image, text, temperature=temperature, top_k=top_k)
    keep = _keep(mask, labels)
    if labels is not None and filter_misaligned:
        right = (_unit(teacher.image) @ _unit(text).T).argmax(-1) == labels
        keep = right if keep is None else keep & right
    return reduce_counted(per_row, keep, reduction)


def vlm_ood_label_ce(student: Any, teacher: Any, *, labels: Tensor | None = None, temperature: float = 0.07,
                     mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """L-cls: the student's image vector classified against the shared `class_text`."""
    labels = _needs_labels("vlm_ood_label_ce", labels)
    text = teacher.class_text.to(student.image.device)
    return reduce_counted(label_text_ce(student.image, text, labels, temperature=temperature), _keep(mask, labels),
                          reduction)


for _fn in (vlm_ood_coherence, vlm_ood_label_ce):
    _fn.batch_fields = {"labels": "labels"}  # type: ignore[attr-defined]  # what the loop passes from the batch
vlm_ood_label_ce.needs_labels = True  # type: ignore[attr-defined]  # the task refuses unlabelled training images

__all__ = ["coherence", "label_text_ce", "visual_contrastive", "visual_mse", "vlm_ood_coherence", "vlm_ood_label_ce",
           "vlm_ood_visual_contrastive", "vlm_ood_visual_mse"]
