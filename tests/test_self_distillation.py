"""Iterated self-distillation with ground-truth mixing (potstill.train.self_distillation) against the kernel-ridge
closed forms of Borup & Andersen 2021."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from potstill.train.self_distillation import KernelRidge, alpha_star, krr_alpha_star, rbf_kernel, self_distill

C, GAMMA = 0.3, 10.0  # under-regularised enough that distillation helps, with an interior α*


def regression(n: int, seed: int, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g, dtype=torch.float64) * 4 - 2
    truth = torch.sin(2 * x[:, 0]) + 0.5 * x[:, 0]
    return x, truth, truth + noise * torch.randn(n, generator=g, dtype=torch.float64)


FIT = partial(KernelRidge.fit, c=C, gamma=GAMMA)


def predict(model: KernelRidge, x: torch.Tensor) -> torch.Tensor:
    return model.predict(x)


def test_alpha_star_by_hand() -> None:
    labels, previous = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    assert alpha_star(labels, previous, torch.tensor([0.5, 0.0])) == pytest.approx(0.5)
    # gap (1, 1), t − previous = (1, 0): α = 1 / 2
    assert alpha_star(torch.tensor([1.0, 1.0]), previous, torch.tensor([1.0, 0.0])) == pytest.approx(0.5)
    assert alpha_star(labels, previous, torch.tensor([2.0, 0.0])) == 1.0
    assert alpha_star(labels, previous, torch.tensor([2.0, 0.0]), clip=False) == pytest.approx(2.0)
    assert alpha_star(labels, previous, torch.tensor([-1.0, 0.0])) == 0.0
    assert alpha_star(previous, previous, torch.tensor([3.0, 1.0])) == 1.0
    with pytest.raises(ValueError, match="differ in size"):
        alpha_star(labels, previous, torch.zeros(3))


def test_constant_alpha_converges_to_ridge_with_c_over_alpha() -> None:
    x, _, y = regression(30, seed=0)
    steps = self_distill(FIT, predict, x, y, steps=300, alpha=0.5)
    fixed_point = KernelRidge.fit(x, y, c=C / 0.5, gamma=GAMMA).predict(x)
    assert torch.allclose(steps.models[-1].predict(x), fixed_point, atol=1e-8)
    assert steps.alphas == [0.5] * 300


def test_alpha_zero_shrinks_the_fit_every_step() -> None:
    x, _, y = regression(30, seed=1)
    steps = self_distill(FIT, predict, x, y, steps=6, alpha=0.0)
    norms = [float(m.predict(x).norm()) for m in steps.models]
    assert all(later < earlier for earlier, later in zip(norms, norms[1:], strict=False))


def test_estimate_on_noise_free_training_points_is_the_closed_form() -> None:
    x, truth, y = regression(40, seed=2)
    steps = self_distill(FIT, predict, x, y, steps=3, x_heldout=x, y_heldout=truth)
    gram = rbf_kernel(x, x, gamma=GAMMA)
    for k, estimated in enumerate(steps.alphas):
        previous = steps.models[k].predict(x)
        assert estimated == pytest.approx(krr_alpha_star(gram, C, y, previous, truth), abs=1e-9)
        assert 0.0 < estimated < 1.0  # a real trade-off here, not a clipped end


def test_heldout_alpha_star_beats_a_grid_of_constant_alphas() -> None:
    x, _, y = regression(60, seed=3)
    xv, _, yv = regression(400, seed=4)
    star = self_distill(FIT, predict, x, y, steps=1, x_heldout=xv, y_heldout=yv)
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        grid = self_distill(FIT, predict, x, y, steps=1, alpha=alpha, x_heldout=xv, y_heldout=yv)
        assert star.heldout_mse[-1] <= grid.heldout_mse[-1] + 1e-12


def test_bad_arguments() -> None:
    x, _, y = regression(5, seed=0)
    with pytest.raises(ValueError, match="x_heldout"):
        self_distill(FIT, predict, x, y, steps=1)
    with pytest.raises(ValueError, match="alpha must be"):
        self_distill(FIT, predict, x, y, steps=1, alpha=1.5)
