"""Distiller's MI-α objective: maximise an interpolated lower bound on the mutual information between teacher and
student hidden states, with a learned critic.

Paper: He et al., SustaiNLP 2021, "Distiller: A Systematic Study of Model Distillation Methods in Natural Language
Processing" — intermediate losses read as lower bounds on I(h_T; h_S); the bound of Poole et al. 2019 ("On
Variational Bounds of Mutual Information") that interpolates InfoNCE and NWJ with α works best.

For one mapped layer pair, the K real tokens of the batch give K pairs (x_k = teacher state, y_k = student
state). The critic is a projection of each side and a dot product, f(x, y) = u·v / √d_c with u = P_t x,
v = P_s y (d_c = `critic_dim`; `critic="bilinear"`, Distiller's form). `critic="quadratic"` adds learned
Σ a_c u_c² + Σ b_c v_c², which holds the optimal critic of jointly Gaussian states (log p(y|x) is quadratic),
so the bound can reach their true MI; a bilinear critic stops at ρ²d/2 for d dims of correlation ρ. The
baseline log q(y) is a learned constant (or a learned linear function of y). With S_ij = f(x_i, y_j):

    m⁺_j = (1/K)     Σ_k     exp S_kj            (all K teacher states, the positive x_j among them)
    m⁻_j = (1/(K−1)) Σ_{k≠j} exp S_kj            (the states independent of y_j)
    I_α  = 1 + mean_j [S_jj − log(α m⁺_j + (1−α) q_j)] − mean_{i≠j} [exp S_ij / (α m⁻_j + (1−α) q_j)]

α = 1 gives InfoNCE exactly (the last mean is then 1): low variance, never above log K. α = 0 gives NWJ with
baseline q (TUBA): unbounded, high variance. The loss is −I_α, averaged over the layer pairs; with
reduction "sum" it is multiplied by the number of real tokens (the loop divides by it again), "none" is refused.
Defaults: α = 0.5 (the paper searches α in [0, 1]), critic_dim = 128, critic "bilinear", layers "uniform",
baseline "constant".
The critic and baseline are trained with the student (the loop adds objective parameters to the optimizer),
checkpointed, and dropped at export.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from .intermediate import LayerSpec, ModelShape, _Bound, layer_map


def interpolated_mi_bound(scores: Tensor, log_baseline: Tensor, alpha: float) -> Tensor:
    """I_α from a K × K critic matrix (`scores[i, j]` = f(x_i, y_j), positives on the diagonal) and log q(y_j)
    (`log_baseline`, shape [K] or a scalar). K ≥ 2; computed in float32 or wider."""
    k = scores.shape[0]
    if scores.dim() != 2 or scores.shape[1] != k or k < 2:
        raise ValueError(f"scores must be a K × K matrix with K >= 2, got {tuple(scores.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    log_q = log_baseline.to(scores.dtype).expand(k)
    eye = torch.eye(k, dtype=torch.bool, device=scores.device)
    log_m_all = torch.logsumexp(scores, dim=0) - math.log(k)
    log_m_others = torch.logsumexp(scores.masked_fill(eye, float("-inf")), dim=0) - math.log(k - 1)

    def log_denominator(log_m: Tensor) -> Tensor:
        if alpha == 1.0:
            return log_m
        if alpha == 0.0:
            return log_q
        return torch.logaddexp(math.log(alpha) + log_m, math.log(1 - alpha) + log_q)

    joint = (scores.diagonal() - log_denominator(log_m_all)).mean()
    ratios = torch.exp(scores - log_denominator(log_m_others)[None, :]).masked_fill(eye, 0.0)
    marginal = ratios.sum() / (k * (k - 1))
    return 1 + joint - marginal


class MIAlpha(_Bound):
    """−I_α between the student's and the teacher's hidden states of mapped layers, with a learned critic per
    layer pair (`potstill objectives`: mi_alpha)."""

    def __init__(self, *, alpha: float = 0.5, critic_dim: int = 128, critic: str = "bilinear",
                 layers: LayerSpec = "uniform", baseline: str = "constant") -> None:
        super().__init__(layers)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if critic_dim < 1:
            raise ValueError(f"critic_dim must be >= 1, got {critic_dim}")
        if critic not in ("bilinear", "quadratic"):
            raise ValueError(f"critic must be 'bilinear' or 'quadratic', got {critic!r}")
        if baseline not in ("constant", "linear"):
            raise ValueError(f"baseline must be 'constant' or 'linear', got {baseline!r}")
        self.alpha, self.critic_dim, self.critic, self.baseline_kind = float(alpha), int(critic_dim), critic, baseline
        self.student_heads = nn.ModuleList()
        self.teacher_heads = nn.ModuleList()
        self.baselines = nn.ModuleList()

    def bind(self, student: ModelShape, teacher: ModelShape) -> None:
        self.pairs = layer_map(self.layers_spec, student.layers, teacher.layers, allow_embeddings=True)
        if not len(self.student_heads):
            self.student_heads = nn.ModuleList(nn.Linear(student.hidden, self.critic_dim, bias=False)
                                               for _ in self.pairs)
            self.teacher_heads = nn.ModuleList(nn.Linear(teacher.hidden, self.critic_dim, bias=False)
                                               for _ in self.pairs)
            self.baselines = nn.ModuleList(_Baseline(student.hidden, self.baseline_kind) for _ in self.pairs)
            if self.critic == "quadratic":
                self.squares = nn.Parameter(torch.zeros(len(self.pairs), 2, self.critic_dim))

    def needs(self) -> dict[str, list[int]]:
        pairs = self._pairs()
        return {"student": sorted({i for i, _ in pairs}), "teacher": sorted({j for _, j in pairs})}

    def estimate(self, student: Tensor, teacher: Tensor, pair: int = 0) -> Tensor:
        """I_α of K paired rows (student [K, D_s], teacher [K, D_t]) under the critic of layer pair `pair`."""
        p_s, p_t = cast(nn.Linear, self.student_heads[pair]), cast(nn.Linear, self.teacher_heads[pair])
        dtype = p_s.weight.dtype
        v, u = p_s(student.to(dtype)), p_t(teacher.to(dtype))
        scores = (u @ v.T) / math.sqrt(self.critic_dim)
        if self.critic == "quadratic":
            a, b = self.squares[pair]
            scores = scores + (u.square() @ a)[:, None] + (v.square() @ b)[None, :]
        return interpolated_mi_bound(scores, self.baselines[pair](student.to(dtype)), self.alpha)

    def forward(self, student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor], *,
                mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"mi_alpha is a bound over the batch's tokens: reduction 'mean' or 'sum', not "
                             f"{reduction!r}")
        pairs = self._pairs()
        total: Tensor | None = None
        count = None
        for k, (i, j) in enumerate(pairs):
            s, t = student_hidden[i + 1], teacher_hidden[j + 1]
            if mask is not None:
                keep = mask.bool()
                s, t = s[keep], t[keep]
            else:
                s, t = s.flatten(0, -2), t.flatten(0, -2)
            count = s.shape[0]
            value = -self.estimate(s, t, k)
            total = value if total is None else total + value
        assert total is not None and count is not None  # layer_map never returns an empty map
        loss = total / len(pairs)
        return loss * count if reduction == "sum" else loss


class _Baseline(nn.Module):
    """log q(y): a learned constant, or a learned linear function of y."""

    def __init__(self, width: int, kind: str) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.linear = nn.Linear(width, 1, bias=False) if kind == "linear" else None
        if self.linear is not None:
            nn.init.zeros_(self.linear.weight)

    def forward(self, y: Tensor) -> Tensor:
        if self.linear is None:
            return self.bias
        return self.linear(y).squeeze(-1) + self.bias


__all__ = ["MIAlpha", "interpolated_mi_bound"]
