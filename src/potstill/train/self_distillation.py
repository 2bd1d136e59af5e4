"""Iterated self-distillation with ground-truth mixing, and its per-step optimal mixing weight α*.

Borup & Andersen 2021, "Even your Teacher Needs Guidance: Ground-Truth Targets Dampen Regularization Imposed by
Self-Distillation" (NeurIPS). A model is refitted several times; step k fits the mixed target

    ỹ^k = α_k · y + (1 − α_k) · f^{k−1}(X)                 (f^0: fitted to y alone)

For kernel ridge regression, f^k(X) = A ỹ^k with A = K (K + cI)⁻¹. Each step without labels (α = 0) multiplies
every eigen-component by d/(d + c) once more, so the fit shrinks towards 0 (ever stronger regularisation); α = 1
never distils (f^k = f^0). With a constant α the iterates converge to kernel ridge with regularisation c/α
(eigen-wise d / (d + c/α)). Because f^k is affine in α_k, the best α_k has a closed form:

    f_α = f_(0) + α (f_(1) − f_(0)),    α* = ⟨f_(1) − f_(0), t − f_(0)⟩ / ‖f_(1) − f_(0)‖²,  clipped to [0, 1]

where f_(1) is the model fitted to the labels and f_(0) the one fitted to the previous step's predictions, both
evaluated where t is known. With t the noise-free function on the training inputs this is the ground-truth optimum
(`krr_alpha_star`); in practice, and for deep networks (where f_α ≈ α f_(1) + (1 − α) f_(0) is the linearisation
the paper uses), the two candidates are evaluated on held-out data with its noisy labels (`alpha_star`).

- `alpha_star(pred_labels, pred_previous, targets)`: the held-out estimate (any tensors of predictions);
- `self_distill(fit, predict, x, y, ...)`: the loop, with α fixed or estimated per step on held-out data;
- `KernelRidge`, `krr_alpha_star`: the kernel case, for checks (float64).

Defaults: 5 distillation steps (the paper's deep-net runs), α estimated per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def alpha_star(pred_labels: Tensor, pred_previous: Tensor, targets: Tensor, *, clip: bool = True) -> float:
    """α minimising ‖α·pred_labels + (1 − α)·pred_previous − targets‖² (all flattened): the step's candidate fitted
    to the labels, the candidate fitted to the previous step's predictions, and the true targets at the same
    points. 1.0 when the candidates agree (α does not matter). Clipped to [0, 1] unless `clip=False`."""
    a, b, t = (x.detach().double().reshape(-1) for x in (pred_labels, pred_previous, targets))
    if not a.shape == b.shape == t.shape:
        raise ValueError(f"predictions and targets differ in size: {a.numel()}, {b.numel()}, {t.numel()}")
    gap = a - b
    norm = float(gap @ gap)
    if norm == 0.0:
        return 1.0
    value = float(gap @ (t - b)) / norm
    return min(max(value, 0.0), 1.0) if clip else value


@dataclass
class SelfDistillationSteps:
    """What `self_distill` did: the fitted models (step 0 first), the α of each distillation step, and the
    held-out mean squared error after every step when held-out data was given."""

    models: list[Any] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)
    heldout_mse: list[float] = field(default_factory=list)


def self_distill(fit: Callable[[Tensor, Tensor], Any], predict: Callable[[Any, Tensor], Tensor], x: Tensor,
                 y: Tensor, *, steps: int = 5, alpha: float | str = "star", x_heldout: Tensor | None = None,
                 y_heldout: Tensor | None = None) -> SelfDistillationSteps:
    """Step 0 fits `y`; each of `steps` distillation steps fits α·y + (1 − α)·(previous predictions on `x`).
    `fit(x, targets)` returns a model, `predict(model, x)` its predictions. `alpha`: a number in [0, 1], or
    "star" to pick each step's α* on (`x_heldout`, `y_heldout`) by fitting the two candidates (α = 1 and α = 0)
    and mixing their targets with the estimate (exact for a model linear in its targets, such as kernel ridge)."""
    if alpha != "star" and not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1] or 'star', got {alpha!r}")
    if alpha == "star" and (x_heldout is None or y_heldout is None):
        raise ValueError("alpha='star' estimates α per step on held-out data: give x_heldout and y_heldout")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    out = SelfDistillationSteps()

    def record(model: Any) -> None:
        out.models.append(model)
        if x_heldout is not None and y_heldout is not None:
            out.heldout_mse.append(float(((predict(model, x_heldout) - y_heldout) ** 2).mean()))

    record(fit(x, y))
    for _ in range(steps):
        previous = predict(out.models[-1], x).detach()
        if alpha == "star":
            assert x_heldout is not None and y_heldout is not None
            on_labels = out.models[0]  # the α = 1 candidate: fitting y again gives the step-0 model
            on_previous = fit(x, previous)
            step_alpha = alpha_star(predict(on_labels, x_heldout), predict(on_previous, x_heldout), y_heldout)
        else:
            step_alpha = float(alpha)
        out.alphas.append(step_alpha)
        record(fit(x, step_alpha * y + (1.0 - step_alpha) * previous))
    return out


def rbf_kernel(a: Tensor, b: Tensor, *, gamma: float) -> Tensor:
    """exp(−γ ‖a_i − b_j‖²) for rows of `a` `[N, D]` and `b` `[M, D]`."""
    return torch.exp(-gamma * torch.cdist(a.double(), b.double()).pow(2))


@dataclass
class KernelRidge:
    """Kernel ridge regression with an RBF kernel: f(x') = k(x', X) (K + cI)⁻¹ t, in float64."""

    x: Tensor
    weights: Tensor
    gamma: float

    @classmethod
    def fit(cls, x: Tensor, targets: Tensor, *, c: float, gamma: float) -> KernelRidge:
        gram = rbf_kernel(x, x, gamma=gamma)
        eye = torch.eye(len(x), dtype=torch.float64)
        return cls(x.double(), torch.linalg.solve(gram + c * eye, targets.double()), gamma)

    def predict(self, x: Tensor) -> Tensor:
        return rbf_kernel(x, self.x, gamma=self.gamma) @ self.weights


def krr_alpha_star(gram: Tensor, c: float, y: Tensor, previous: Tensor, truth: Tensor) -> float:
    """The ground-truth α* of one kernel-ridge distillation step, in closed form: with A = K (K + cI)⁻¹ and
    f_α = A (α y + (1 − α) previous), the α in [0, 1] minimising ‖f_α − truth‖² on the training inputs."""
    smoother = gram.double() @ torch.linalg.inv(gram.double() + c * torch.eye(len(gram), dtype=torch.float64))
    on_labels, on_previous = smoother @ y.double(), smoother @ previous.double()
    return alpha_star(on_labels, on_previous, truth)
