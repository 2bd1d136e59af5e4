"""VQGraph's student losses: soft code assignments and soft labels.

Paper: Yang et al., "VQGraph: Rethinking Graph Representation Space for Bridging GNNs and MLPs" (ICLR 2024).

A GNN teacher with a vector-quantised codebook E (M codewords of dimension d, see `potstill.teachers.vqgraph`)
turns every node into a distribution over the codewords. An MLP student whose hidden layer has width d is taught
to place each node the same way relative to the codebook, and to match the teacher's class probabilities.

- Soft code assignment of a vector h against the codebook: `r_m(h) = softmax_m(−‖h − E_m‖² / τ)`
  (squared Euclidean distance; `soft_code_assignments`).
- Code loss (`soft_code_kl`): `τ² · KL(r(h_T) ‖ r(z_S))` per node, h_T the teacher's pre-quantisation
  embedding, z_S the student's hidden vector; the codebook is fixed (the teacher's). It is 0 when z_S = h_T.
- Soft-label loss (`soft_label_loss`): `λ_h · CE(y, p_S) + (1 − λ_h) · KL(p_T ‖ p_S)` per node, p = softmax
  of the logits (no temperature). λ_h = 0 (the default) is GLNN's logit-only distillation.
- Student objective: `soft_label_loss + λ_tok · soft_code_kl`.

Defaults: τ = 4 (the paper's code), λ_h = 0. The paper's per-dataset scripts pick λ_tok; potstill's benchmark
uses 1.0 (benchmarks/vqgraph.py). Δ from the authors' code: there the soft-label and code terms take separate
optimizer steps each epoch; here they are one summed loss.

`vqgraph_code_kl` is the objective form (catalogue kind "graph"): it reads the `graph`
task's signals of both sides (any objects with `hidden`, the teacher's also with `codebook`).

Reduction: "mean" averages the per-node values over the counted nodes (`mask`, True = counted), "sum" adds them,
"none" returns them per node.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["soft_code_assignments", "soft_code_kl", "soft_label_loss", "vqgraph_code_kl"]


def _reduce(per_node: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f'reduction must be "mean", "sum" or "none", got {reduction!r}')
    if mask is not None:
        per_node = per_node * mask.to(per_node.dtype)
    if reduction == "none":
        return per_node
    total = per_node.sum()
    if reduction == "sum":
        return total
    count = per_node.numel() if mask is None else mask.sum()
    return total / torch.clamp(torch.as_tensor(count, dtype=total.dtype, device=total.device), min=1)


def _code_logits(vectors: Tensor, codebook: Tensor, temperature: float) -> Tensor:
    """−‖v − E_m‖² / τ for every vector v [N, d] and codeword E_m [M, d]: shape [N, M], float32."""
    if vectors.shape[-1] != codebook.shape[-1]:
        raise ValueError(f"vectors have dimension {vectors.shape[-1]} but the codebook's codewords have "
                         f"{codebook.shape[-1]}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    v, e = vectors.float(), codebook.float()
    squared = (v * v).sum(-1, keepdim=True) - 2 * v @ e.T + (e * e).sum(-1)
    return -squared.clamp_min(0) / temperature


def soft_code_assignments(vectors: Tensor, codebook: Tensor, *, temperature: float = 4.0) -> Tensor:
    """r_m(v) = softmax_m(−‖v − E_m‖² / τ): each vector's distribution over the codewords, shape [N, M]."""
    return torch.softmax(_code_logits(vectors, codebook, temperature), dim=-1)


def soft_code_kl(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    codebook: Tensor,
    *,
    temperature: float = 4.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """τ² · KL(r(teacher_hidden) ‖ r(student_hidden)) per node, against the teacher's `codebook` [M, d].

    Gradients flow into `student_hidden` only (the teacher's side and the codebook are detached).
    """
    book = codebook.detach()
    if book.is_inference():  # a teacher's output made under torch.inference_mode: autograd may not save it
        book = book.clone()
    log_student = torch.log_softmax(_code_logits(student_hidden, book, temperature), dim=-1)
    log_teacher = torch.log_softmax(_code_logits(teacher_hidden.detach(), book, temperature), dim=-1)
    per_node = (log_teacher.exp() * (log_teacher - log_student)).sum(-1) * temperature**2
    return _reduce(per_node, mask, reduction)


def vqgraph_code_kl(student: Any, teacher: Any, *, temperature: float = 4.0, mask: Tensor | None = None,
                  reduction: str = "mean") -> Tensor:
    """`soft_code_kl` on the graph task's signals: τ² · KL(r(h_T) ‖ r(z_S)) per node, h_T = `teacher.hidden`,
    z_S = `student.hidden`, r against `teacher.codebook`."""
    if getattr(teacher, "codebook", None) is None:
        raise ValueError("vqgraph_code_kl needs the teacher's codebook; the teacher's signal has none")
    return soft_code_kl(student.hidden, teacher.hidden, teacher.codebook.to(student.hidden.device),
                        temperature=temperature, mask=mask, reduction=reduction)


def soft_label_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    label_weight: float = 0.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """λ_h · CE(y, p_S) + (1 − λ_h) · KL(p_T ‖ p_S) per node; `labels` are needed only when λ_h > 0
    (a label of -100 counts as masked for the CE term)."""
    if not 0.0 <= label_weight <= 1.0:
        raise ValueError(f"label_weight must be in [0, 1], got {label_weight}")
    log_student = torch.log_softmax(student_logits.float(), dim=-1)
    log_teacher = torch.log_softmax(teacher_logits.detach().float(), dim=-1)
    per_node = (1 - label_weight) * (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    if label_weight > 0:
        if labels is None:
            raise ValueError("soft_label_loss needs labels when label_weight > 0")
        ce = F.cross_entropy(log_student, labels.clamp_min(0), reduction="none")
        per_node = per_node + label_weight * ce * (labels != -100).to(ce.dtype)
    return _reduce(per_node, mask, reduction)
