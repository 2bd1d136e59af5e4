"""LAD: label-assisted distillation for semantic segmentation — the label-noising operator and both losses.

Paper: Qiu et al., "Make a Strong Teacher with Label Assistance: A Novel Knowledge Distillation Approach for
Semantic Segmentation" (2024; code: skyshoumeng/Label_Assisted_Distillation; spec in methods-b §17).
A light teacher f becomes strong by reading, besides the image x, a corrupted copy N(y) of the ground-truth
mask as C extra one-hot input channels (privileged information; builder:
`potstill.teachers.lad.LabelAssistedTeacher`). The student g sees the image only and learns from the teacher
by ordinary pixel-wise KD; during KD the teacher is again fed a noised training label.

The authors released evaluation code only; the teacher's noising and dual-path training are not public, so the
operators below are this project's reading of the paper's formulas, and every choice is a parameter:

- `noise_labels` — N(y): each pixel (`mode="pixel"`) or each `block`×`block` square region (`mode="block"`) is,
  with probability p (default 0.5), replaced by a class drawn uniformly from the C classes (it may draw the true
  one, so about p·(C−1)/C of the pixels end up wrong). In block mode a region gets one class.
- `lad_teacher_loss` — the dual-path teacher objective, two independent noise draws N₁, N₂ of the same mask:
  `L_T = CE(f(x,N₁y), y) + CE(f(x,N₂y), y) + λ·dist(f(x,N₁y), f(x,N₂y))`, default λ = 1.
  `dist` (`consistency_distance`), on the per-pixel class probabilities p = softmax(logits), averaged over
  pixels: `"symmetric_kl"` (default) ½[KL(p₁‖p₂) + KL(p₂‖p₁)], or `"mse"` Σ_c (p₁,c − p₂,c)². The gradient
  flows through both paths (no stop-gradient).
- `lad_student_loss` — pixel-wise KD:
  `L_S = CE(g(x), y) + α·T²·mean_pix KL(softmax(f(x,Ny)/T) ‖ softmax(g(x)/T))`, defaults α = 1, T = 1 (the
  CIRKD pixel-KD settings the paper builds on). The teacher logits are detached.

Logits are (N, C, H, W); masks (N, H, W) with classes 0..C−1 (no ignore index). CE terms are the mean over
pixels. Torch only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["consistency_distance", "lad_student_loss", "lad_teacher_loss", "label_channels", "noise_labels"]

NOISE_MODES = ("pixel", "block")
DISTANCES = ("symmetric_kl", "mse")


def noise_labels(labels: Tensor, num_classes: int, p: float = 0.5, mode: str = "pixel", block: int = 4,
                 generator: torch.Generator | None = None) -> Tensor:
    """N(y): replace each pixel (or each `block`×`block` region) of the (N, H, W) mask with probability `p` by a
    uniformly drawn class in 0..num_classes−1. Returns a new int64 mask of the same shape."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"noise_labels: p must lie in [0, 1], got {p}")
    if mode not in NOISE_MODES:
        raise ValueError(f"noise_labels: mode must be one of {', '.join(NOISE_MODES)}, got {mode!r}")
    if labels.dim() != 3:
        raise ValueError(f"noise_labels: labels must be (N, H, W), got shape {tuple(labels.shape)}")
    n, h, w = labels.shape
    if mode == "pixel":
        grid = (n, h, w)
    else:
        if block < 1:
            raise ValueError(f"noise_labels: block must be ≥ 1, got {block}")
        grid = (n, math.ceil(h / block), math.ceil(w / block))
    replace = torch.rand(grid, generator=generator) < p
    drawn = torch.randint(0, num_classes, grid, generator=generator)
    if mode == "block":
        replace = replace.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :h, :w]
        drawn = drawn.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :h, :w]
    replace, drawn = replace.to(labels.device), drawn.to(labels.device)
    return torch.where(replace, drawn, labels.long())


def label_channels(labels: Tensor, num_classes: int) -> Tensor:
    """The (N, H, W) mask as (N, C, H, W) float one-hot channels, the teacher's extra input."""
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()


def consistency_distance(logits_a: Tensor, logits_b: Tensor, distance: str = "symmetric_kl") -> Tensor:
    """dist(a, b) between two (N, C, H, W) logit maps, the mean over pixels (see the module docstring)."""
    if distance not in DISTANCES:
        raise ValueError(f"consistency_distance: distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
    log_a, log_b = F.log_softmax(logits_a, dim=1), F.log_softmax(logits_b, dim=1)
    prob_a, prob_b = log_a.exp(), log_b.exp()
    if distance == "symmetric_kl":
        # ½[KL(a‖b) + KL(b‖a)] = ½ Σ_c (p_a − p_b)(log p_a − log p_b)
        per_pixel = 0.5 * ((prob_a - prob_b) * (log_a - log_b)).sum(dim=1)
    else:
        per_pixel = ((prob_a - prob_b) ** 2).sum(dim=1)
    return per_pixel.mean()


def lad_teacher_loss(logits_a: Tensor, logits_b: Tensor, labels: Tensor, consistency_weight: float = 1.0,
                     distance: str = "symmetric_kl") -> Tensor:
    """L_T = CE(f(x,N₁y), y) + CE(f(x,N₂y), y) + λ·dist(f(x,N₁y), f(x,N₂y)), with λ = `consistency_weight`."""
    loss = F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels)
    if consistency_weight:
        loss = loss + consistency_weight * consistency_distance(logits_a, logits_b, distance)
    return loss


def lad_student_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float = 1.0,
                     temperature: float = 1.0) -> Tensor:
    """L_S = CE(g(x), y) + α·T²·mean_pix KL(softmax(f(x,Ny)/T) ‖ softmax(g(x)/T)); teacher logits detached."""
    if temperature <= 0:
        raise ValueError(f"lad_student_loss: temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"lad_student_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    ce = F.cross_entropy(student_logits, labels)
    log_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=1).mean()
    return ce + alpha * temperature**2 * kl
