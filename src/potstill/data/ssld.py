"""SSLD's unlabelled-pool selection (Cui et al. 2021, "Beyond Self-Supervision: A Simple Yet Effective Network
Distillation Alternative to Improve Backbones"; code PaddlePaddle/PaddleClas).

SSLD distils with the Jensen-Shannon divergence alone (`potstill.losses.js_divergence`), so unlabelled images
can join training. Which ones: the pool is first de-duplicated against the evaluation images (exact equality
here: sha256 of the pixel bytes), then, for every class, the images the teacher assigns to that class (top-1)
with the highest probability are kept, at most `per_class` each (the paper keeps the top-k ImageNet-22k images
per ImageNet-1k class, ~4 M in all, merged with the labelled set). A short fine-tune on the labelled set at a
lower learning rate follows (the paper: 30 epochs at 0.01–0.1 × the lr): a second recipe on the distilled
student (`recipes/mnist-ssld.yaml`, `recipes/mnist-ssld-finetune.yaml`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from potstill.data.images import image_hashes


@dataclass(frozen=True)
class SSLDSelection:
    """The kept pool rows (sorted), how many per teacher class, and how many were dropped and why."""

    indices: list[int]
    per_class: dict[int, int] = field(default_factory=dict)
    duplicates: int = 0
    below_confidence: int = 0

    def as_json(self) -> dict:
        return {"kept": len(self.indices), "per_class": {str(k): v for k, v in sorted(self.per_class.items())},
                "duplicates_of_eval": self.duplicates, "below_min_confidence": self.below_confidence,
                "indices": self.indices}


def duplicates_of(pool: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Bool (N,): pool image i equals some `reference` image byte for byte (same dtype and shape)."""
    seen = set(image_hashes(reference)) if len(reference) else set()
    return torch.tensor([h in seen for h in image_hashes(pool)], dtype=torch.bool)


def ssld_select(teacher_probs: torch.Tensor, *, per_class: int, exclude: torch.Tensor | None = None,
                min_confidence: float = 0.0) -> SSLDSelection:
    """Per teacher top-1 class, the `per_class` rows of `teacher_probs` (N, C) with the highest top-1
    probability, ties broken by row order; rows in `exclude` (bool, N) or below `min_confidence` are skipped."""
    if teacher_probs.dim() != 2:
        raise ValueError(f"teacher_probs must be (rows, classes), got shape {tuple(teacher_probs.shape)}")
    confidence, predicted = teacher_probs.float().max(dim=1)
    n = teacher_probs.shape[0]
    excluded = torch.zeros(n, dtype=torch.bool) if exclude is None else exclude.bool()
    weak = (confidence < min_confidence) & ~excluded
    eligible = ~excluded & ~weak
    kept: list[int] = []
    counts: dict[int, int] = {}
    for cls in torch.unique(predicted[eligible]).tolist():
        rows = torch.nonzero(eligible & (predicted == cls)).flatten()
        order = sorted(rows.tolist(), key=lambda i: (-float(confidence[i]), i))[:per_class]
        kept += order
        counts[int(cls)] = len(order)
    return SSLDSelection(sorted(kept), counts, int(excluded.sum()), int(weak.sum()))
