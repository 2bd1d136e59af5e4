"""Tests for the SinKD Sinkhorn loss against independent float64 references written here."""

from __future__ import annotations

import importlib

import pytest
import torch
from test_losses import close, logits_pair, random_mask
from test_losses import reference_reduce as reduce_ref
from test_losses_taid import _grads

from potstill.losses import forward_kl, sinkhorn, sinkhorn_plan
from potstill.losses.sinkhorn import pairwise_l1

REDUCTIONS = ["mean", "sum", "none"]


pytestmark = pytest.mark.usefixtures("one_thread")


# --- Sinkhorn ------------------------------------------------------------------------------------------


def sinkhorn_ref_rows(s, z, temperature=2.0, epsilon=0.1, iterations=20):
    """Float64 per-row Σ_j Π_ij W_ij: L1 costs by broadcasting, multiplicative row / column normalisation."""
    p_s = torch.softmax(s.double() / temperature, -1)
    p_t = torch.softmax(z.double() / temperature, -1)
    cost = (p_s[:, None, :] - p_t[None, :, :]).abs().sum(-1)
    plan = torch.exp(-cost / epsilon)
    for _ in range(iterations):
        plan = plan / plan.sum(1, keepdim=True)
        plan = plan / plan.sum(0, keepdim=True)
    return (plan * cost).sum(1)


def test_sinkhorn_plan_has_unit_row_and_column_sums():
    g = torch.Generator().manual_seed(20)
    p = torch.softmax(torch.randn(12, 30, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(12, 30, generator=g) * 2, -1)
    cost = pairwise_l1(p, q)
    for c in (cost, cost.T.contiguous()):
        plan = sinkhorn_plan(c, 0.1, 20)
        assert plan.shape == (12, 12) and (plan >= 0).all()
        close(plan.sum(0), torch.ones(12), rtol=0, atol=1e-4)
        close(plan.sum(1), torch.ones(12), rtol=0, atol=1e-4)
    # tiny ε would underflow exp(−W/ε) to 0 in the multiplicative form; the log-domain plan stays finite
    assert torch.isfinite(sinkhorn_plan(cost, 1e-4, 20)).all()


def test_pairwise_l1_values_and_gradients(monkeypatch):
    module = importlib.import_module("potstill.losses.sinkhorn")  # the attribute of the package is the function
    monkeypatch.setattr(module, "_L1_BACKWARD_ELEMENTS", 40)  # forces many slices in the backward
    g = torch.Generator().manual_seed(21)
    x = torch.randn(7, 5, generator=g)
    y = torch.randn(4, 5, generator=g)
    y[1] = x[2]  # exact ties: the L1 subgradient is 0 there, as for abs()
    got = _grads(pairwise_l1, x, y)
    want = _grads(lambda a, b: (a.double()[:, None] - b.double()[None]).abs().sum(-1), x, y)
    for a, b in zip(got, want, strict=True):
        close(a, b)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sinkhorn_matches_float64_reference(reduction):
    s, z = logits_pair((3, 4, 9), seed=22, scale=3.0)
    mask = random_mask((3, 4), seed=23)
    for kwargs in ({}, {"temperature": 1.0, "epsilon": 0.05, "iterations": 10}):
        got = _grads(lambda a, b, kw=kwargs: sinkhorn(a, b, mask=mask, reduction=reduction, **kw), s, z)

        def ref(a, b, kw=kwargs):
            rows = torch.zeros(3, 4, dtype=torch.float64)
            rows[mask] = sinkhorn_ref_rows(a[mask], b[mask], **kw)
            return reduce_ref(rows, mask, reduction)

        want = _grads(ref, s, z)
        assert got[0].dtype == torch.float32 and got[0].shape == want[0].shape
        for g, w in zip(got, want, strict=True):
            close(g, w, rtol=1e-4, atol=1e-6)


def test_sinkhorn_is_near_zero_when_student_equals_teacher():
    g = torch.Generator().manual_seed(24)
    z = torch.randn(10, 16, generator=g) * 4
    same = sinkhorn(z, z, epsilon=0.01, temperature=1.0)
    disjoint_s = torch.full((10, 16), -20.0)
    disjoint_s[:, 0] = 20.0
    disjoint_t = torch.full((10, 16), -20.0)
    disjoint_t[:, 1] = 20.0
    disjoint = sinkhorn(disjoint_s, disjoint_t, epsilon=0.01, temperature=1.0)
    assert disjoint.item() == pytest.approx(2.0, abs=1e-3)
    assert 0 <= same.item() < 1e-3 * disjoint.item()


def test_sinkhorn_gradient_is_finite_and_bounded_for_disjoint_supports():
    s = torch.full((6, 10), -30.0)
    s[:, 0] = 30.0
    z = torch.full((6, 10), -30.0)
    z[:, 5] = 30.0
    s[3, 0], s[3, 2] = 0.0, 1.0  # one row less extreme
    assert forward_kl(s, z).item() > 50  # KL is huge here
    s.requires_grad_(True)
    for temperature in (1.0, 2.0):
        out = sinkhorn(s, z, temperature=temperature)
        assert torch.isfinite(out) and 0 < out.item() <= 2.0 + 1e-5
        (grad,) = torch.autograd.grad(out, s)
        assert torch.isfinite(grad).all() and grad.abs().max().item() < 10.0
        assert grad.abs().sum().item() > 0


def test_sinkhorn_mask_labels_and_reductions():
    s, z = logits_pair((3, 5, 8), seed=25)
    mask = random_mask((3, 5), seed=26)
    rows = sinkhorn(s, z, mask=mask, reduction="none")
    assert rows.shape == (3, 5) and (rows[~mask] == 0).all() and (rows[mask] > 0).all()
    close(sinkhorn(s, z, mask=mask, reduction="sum"), rows.sum())
    close(sinkhorn(s, z, mask=mask), rows.sum() / mask.sum())
    close(rows[mask], sinkhorn(s[mask], z[mask], reduction="none"))  # masking = dropping the rows
    labels = torch.randint(0, 8, (3, 5)).masked_fill(~mask, -100)
    for reduction in REDUCTIONS:
        close(sinkhorn(s, z, labels=labels, reduction=reduction), sinkhorn(s, z, mask=mask, reduction=reduction))
    # garbage in masked rows does not leak into values or gradients
    s_bad = s.clone()
    s_bad[~mask] = float("nan")
    s_bad.requires_grad_(True)
    out = sinkhorn(s_bad, z, mask=mask)
    close(out, sinkhorn(s, z, mask=mask))
    (grad,) = torch.autograd.grad(out, s_bad)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all() and (grad[mask] != 0).any()
    # nothing counted: 0, still differentiable
    s.requires_grad_(True)
    none = torch.zeros(3, 5, dtype=torch.bool)
    empty = sinkhorn(s, z, mask=none)
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert (s.grad == 0).all()
    assert sinkhorn(s, z, mask=none, reduction="sum").item() == 0.0
    assert (sinkhorn(s, z, mask=none, reduction="none") == 0).all()
    # one row, and a single 1-D row: the plan is [[1]] and the value the L1 distance
    p_s, p_t = torch.softmax(s[0, 0].detach() / 2, -1), torch.softmax(z[0, 0] / 2, -1)
    close(sinkhorn(s[0, 0], z[0, 0]), (p_s - p_t).abs().sum())


@pytest.mark.parametrize("block_size", [1, 3, 4, 100])
def test_sinkhorn_block_size_solves_each_block_separately(block_size):
    s, z = logits_pair((2, 6, 7), seed=27)
    mask = random_mask((2, 6), seed=28)
    got = _grads(lambda a, b: sinkhorn(a, b, mask=mask, block_size=block_size, reduction="none"), s, z)

    def by_hand(a, b):
        sel_s, sel_t = a[mask], b[mask]
        blocks = [
            sinkhorn(sel_s[i : i + block_size], sel_t[i : i + block_size], reduction="none")
            for i in range(0, sel_s.shape[0], block_size)
        ]
        rows = torch.zeros(2, 6)
        rows[mask] = torch.cat(blocks)
        return rows

    want = _grads(by_hand, s, z)
    for g, w in zip(got, want, strict=True):
        close(g, w)
    if block_size == 1:  # one row per problem: the plain L1 distance of each row pair
        p_s, p_t = torch.softmax(s / 2, -1), torch.softmax(z / 2, -1)
        close(got[0], torch.where(mask, (p_s - p_t).abs().sum(-1), 0.0))
    if block_size >= mask.sum():
        close(got[0], _grads(lambda a, b: sinkhorn(a, b, mask=mask, reduction="none"), s, z)[0])


def test_sinkhorn_bf16_input_gives_float32_output():
    s, z = logits_pair((5, 6), seed=29)
    out = sinkhorn(s.bfloat16(), z.bfloat16())
    assert out.dtype == torch.float32
    close(out, sinkhorn_ref_rows(s.bfloat16().float(), z.bfloat16().float()).mean(), rtol=1e-4, atol=1e-6)


def test_sinkhorn_errors():
    s, z = logits_pair((4, 5))
    for kwargs, match in [
        ({"temperature": -1.0}, "temperature"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": float("inf")}, "epsilon"),
        ({"iterations": 0}, "iterations"),
        ({"iterations": 2.5}, "iterations"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": True}, "block_size"),
        ({"reduction": "avg"}, "reduction"),
        ({"mask": torch.ones(3, dtype=torch.bool)}, "mask must have shape"),
        ({"mask": torch.ones(4, dtype=torch.bool), "labels": torch.zeros(4, dtype=torch.long)}, "either mask"),
    ]:
        with pytest.raises(ValueError, match=match):
            sinkhorn(s, z, **kwargs)
    with pytest.raises(ValueError, match="same shape"):
        sinkhorn(s, z[:, :4])
    with pytest.raises(ValueError, match="2-D"):
        sinkhorn_plan(torch.zeros(3))
