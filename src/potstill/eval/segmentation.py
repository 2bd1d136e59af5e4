"""Semantic-segmentation metrics over a whole split: mean IoU, pixel accuracy, pixel agreement.

mIoU sums the confusion matrix over every pixel of the split first, then takes per class IoU_c = TP_c /
(TP_c + FP_c + FN_c) and averages over the classes (a class that appears in neither prediction nor target counts
0, as in `benchmarks/lad_segmentation.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["confusion_matrix", "confusion_miou", "mean_iou", "pixel_agreement", "segmentation_metrics"]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """(C, C) counts, row = target class, column = predicted class, over every pixel of `pred` / `target`."""
    counts = torch.bincount(target.flatten().long() * num_classes + pred.flatten().long(), minlength=num_classes**2)
    return counts.view(num_classes, num_classes)


def mean_iou(pred: Tensor, target: Tensor, num_classes: int) -> float:
    """mIoU over `num_classes` classes with intersection and union summed over every pixel."""
    return confusion_miou(confusion_matrix(pred, target, num_classes))


def confusion_miou(confusion: Tensor) -> float:
    """mIoU of a (C, C) confusion matrix (e.g. summed over batches): mean over classes of TP / (TP + FP + FN)."""
    conf = confusion.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    return float((inter / union.clamp(min=1)).mean())


def pixel_agreement(pred: Tensor, other: Tensor) -> float:
    """Share of pixels where two class maps agree (e.g. student and teacher argmax)."""
    return float((pred == other).float().mean())


def segmentation_metrics(pred: Tensor, target: Tensor, num_classes: int,
                         teacher_pred: Tensor | None = None) -> dict[str, float]:
    """{miou, pixel_accuracy} of a predicted class map against the target, plus `agreement` with the teacher's."""
    out = {"miou": mean_iou(pred, target, num_classes), "pixel_accuracy": pixel_agreement(pred, target)}
    if teacher_pred is not None:
        out["agreement"] = pixel_agreement(pred, teacher_pred)
    return out
