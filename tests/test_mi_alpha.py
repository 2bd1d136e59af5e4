"""Distiller's MI-α: the interpolated bound by hand, and its behaviour on correlated Gaussians of known MI."""

from __future__ import annotations

import math

import pytest
import torch

from potstill.losses import OBJECTIVES
from potstill.losses.intermediate import ModelShape
from potstill.losses.mi_alpha import MIAlpha, interpolated_mi_bound

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("alpha, expected", [
    (1.0, 1 - math.log((math.e + 1) / 2)),   # InfoNCE: m⁺ = (e + 1)/2; the negative term is exactly 1
    (0.0, 1.0),                                # NWJ with q = 1: 1 + 1 − e⁰
    (0.5, 1 - math.log((math.e + 3) / 4)),   # denominator ½(e + 1)/2 + ½ for the positives, ½·1 + ½ = 1 otherwise
])
def test_bound_by_hand_on_a_2x2_critic(alpha, expected):
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert interpolated_mi_bound(scores, torch.tensor(0.0), alpha).item() == pytest.approx(expected, abs=1e-6)


def test_infonce_end_never_exceeds_log_k():
    k = 8
    capped = interpolated_mi_bound(100 * torch.eye(k), torch.tensor(0.0), 1.0).item()
    assert capped == pytest.approx(math.log(k), abs=1e-5)
    assert interpolated_mi_bound(torch.randn(k, k) * 5, torch.tensor(0.0), 1.0).item() <= math.log(k) + 1e-5
    with pytest.raises(ValueError, match="alpha"):
        interpolated_mi_bound(torch.eye(2), torch.tensor(0.0), 1.5)


def gaussians(k: int, d: int, rho: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(student y, teacher x) with y = ρx + √(1 − ρ²)ε per dimension: I(x; y) = −½·d·log(1 − ρ²)."""
    x = torch.randn(k, d, generator=g)
    return rho * x + math.sqrt(1 - rho**2) * torch.randn(k, d, generator=g), x


def fit(alpha: float, d: int, rho: float, *, k: int = 64, steps: int = 300, critic: str = "quadratic",
        seed: int = 0) -> torch.Tensor:
    """Maximise I_α over the critic on fresh batches, then return 50 estimates on held-out batches."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    obj = MIAlpha(alpha=alpha, critic_dim=d, critic=critic, layers="last")
    obj.bind(ModelShape(1, d, 1), ModelShape(1, d, 1))
    opt = torch.optim.Adam(obj.parameters(), lr=0.02)
    for _ in range(steps):
        loss = -obj.estimate(*gaussians(k, d, rho, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.stack([obj.estimate(*gaussians(k, d, rho, g)) for _ in range(50)])


def test_estimate_approaches_the_true_mi():
    true = -0.5 * 4 * math.log(1 - 0.5**2)  # 0.575 nats
    estimate = fit(0.5, 4, 0.5).mean().item()
    assert abs(estimate - true) < 0.05
    # a bilinear critic stops near ρ²d/2 = 0.5 (it lacks the ‖x‖² term of the optimal Gaussian critic)
    bilinear = fit(0.5, 4, 0.5, critic="bilinear").mean().item()
    assert 0.4 < bilinear < true - 0.05


def test_infonce_is_capped_by_log_k_and_variance_grows_as_alpha_falls():
    k, true = 64, -0.5 * 10 * math.log(1 - 0.9**2)  # 8.3 nats, far above log 64 = 4.16
    at_one, at_small = fit(1.0, 10, 0.9, k=k), fit(0.01, 10, 0.9, k=k)
    assert at_one.max().item() <= math.log(k) + 1e-5
    assert at_one.mean().item() > math.log(k) - 0.5 and at_one.mean().item() < true
    assert at_small.std().item() > 3 * at_one.std().item()


def test_objective_on_hidden_states_and_its_catalogue_entry():
    obj = OBJECTIVES["mi_alpha"].fn(alpha=1.0, critic_dim=4, layers="last")
    obj.bind(ModelShape(2, 6, 2), ModelShape(3, 8, 2))
    assert obj.needs() == {"student": [1], "teacher": [2]}
    torch.manual_seed(0)
    student = [torch.randn(2, 5, 6, requires_grad=True) for _ in range(3)]
    teacher = [torch.randn(2, 5, 8) for _ in range(4)]
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mean = obj(student, teacher, mask=mask)
    assert obj(student, teacher, mask=mask, reduction="sum").item() == pytest.approx(8 * mean.item(), rel=1e-5)
    # the critic sees only the 8 real tokens: the padded ones do not change the loss
    moved = [s.detach().clone() for s in student]
    moved[2][1, 3:] += 100
    assert obj(moved, teacher, mask=mask).item() == pytest.approx(mean.item(), abs=1e-6)
    mean.backward()
    assert student[2].grad is not None and obj.student_heads[0].weight.grad is not None
    with pytest.raises(ValueError, match="reduction"):
        obj(student, teacher, mask=mask, reduction="none")


def test_a_run_trains_the_critic_with_the_student(tmp_path):
    from conftest import embedding_recipe, numbered_texts_jsonl, tiny_bert_encoder

    from potstill.config import validate_recipe
    from potstill.train import run_recipe

    teacher = tiny_bert_encoder(tmp_path / "teacher", num_hidden_layers=2)
    train = numbered_texts_jsonl(tmp_path / "train.jsonl", ["a small cat sat", "the dog ran far away",
                                                            "rain on the roof", "two plus two is four"] * 4)
    raw = embedding_recipe(tmp_path, teacher, train, name="mi", student={"init": "layers_from_teacher", "layers": [1]},
                           objectives=[{"name": "embedding_mse"},
                                       {"name": "mi_alpha", "params": {"alpha": 0.5, "critic_dim": 8}}],
                           max_steps=2, log_every=1)
    summary = run_recipe(validate_recipe(raw))
    assert summary["steps"] == 2
    import json

    lines = [json.loads(x) for x in (tmp_path / "runs" / "mi" / "metrics.jsonl").read_text().splitlines()]
    values = [x["obj/mi_alpha"] for x in lines if "obj/mi_alpha" in x]
    assert len(values) == 2 and all(math.isfinite(v) for v in values)
