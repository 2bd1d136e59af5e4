"""ULD and GOLD against a top-k teacher (potstill.losses.uld_topk): a hand-computed value, and equality with the
dense `uld` / `gold` on the spread vector the cached rows stand for (values and gradients), whichever vocabulary
is wider, with merge factors, with few unmatched ids, and with k = V_t (the live teacher)."""

from __future__ import annotations

import math

import pytest
import torch

from potstill.losses.sparse import TopKTeacher
from potstill.losses.uld import gold, uld
from potstill.losses.uld_topk import gold_topk, spread_tail, uld_topk


def test_spread_tail_places_the_top_k_and_shares_the_tail_evenly():
    ids = torch.tensor([[3, 0]])
    dense = spread_tail(ids, torch.tensor([[math.log(0.5), math.log(0.2)]]), torch.tensor([math.log(0.3)]), vocab=5)
    torch.testing.assert_close(dense.exp(), torch.tensor([[0.2, 0.1, 0.1, 0.5, 0.1]]))
    full = spread_tail(torch.tensor([[1, 0]]), torch.tensor([[math.log(0.75), math.log(0.25)]]),
                       torch.tensor([-math.inf]), vocab=2)
    torch.testing.assert_close(full.exp(), torch.tensor([[0.25, 0.75]]))


def test_uld_topk_by_hand():
    # teacher over 4 ids: 0.5 at id 2, 0.3 at id 0, tail 0.2 shared by ids 1 and 3 → sorted .5 .3 .1 .1
    teacher = TopKTeacher(torch.tensor([[2, 0]]), torch.tensor([[math.log(0.5), math.log(0.3)]]),
                          torch.tensor([math.log(0.2)]))
    student = torch.tensor([[0.6, 0.3, 0.1]]).log()  # sorted .6 .3 .1 and a zero pad
    value = uld_topk(student, teacher, teacher_vocab=4)
    assert value.item() == pytest.approx(0.1 + 0.0 + 0.0 + 0.1, abs=1e-6)


def _case(n, v_s, v_t, k, seed):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, v_s, generator=g) * 2).requires_grad_()
    full = torch.log_softmax(torch.randn(n, v_t, generator=g) * 3, -1)
    top = full.topk(k, -1)
    tail = full.scatter(1, top.indices, -math.inf).logsumexp(-1)
    teacher = TopKTeacher(top.indices, top.values, tail if k < v_t else torch.full((n,), -math.inf))
    scales = (-torch.rand(n, generator=g) * 2, -torch.rand(n, generator=g))
    return student, full, teacher, scales


def _matched(v_s, v_t, m, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(v_t, generator=g)[:m], torch.randperm(v_s, generator=g)[:m]], 1)


@pytest.mark.parametrize(("v_s", "v_t", "k", "m"), [(50, 600, 8, 20), (80, 30, 5, 12), (60, 40, 8, 30),
                                                    (50, 600, 600, 20)])
def test_topk_forms_equal_the_dense_losses_on_the_spread_vector(v_s, v_t, k, m):
    student, full, teacher, (s_scale, t_scale) = _case(6, v_s, v_t, k, seed=v_s + k)
    spread = spread_tail(teacher.ids, teacher.logprobs, teacher.tail(), v_t)
    if k == v_t:  # every id kept: the spread vector is the teacher itself
        torch.testing.assert_close(spread, full)
    matched = _matched(v_s, v_t, m, seed=m)
    for dense_fn, topk_fn, extra in ((uld, uld_topk, {}), (gold, gold_topk, {"matched_ids": matched}),
                                     (gold, gold_topk, {"matched_ids": matched, "matched_weight": 0.7, "beta": 0.2})):
        common = {"student_log_scale": s_scale, "teacher_log_scale": t_scale, "temperature": 1.5, **extra}
        want = dense_fn(student, spread, teacher_temperature=1.0, **common)
        (want_grad,) = torch.autograd.grad(want, student)
        got = topk_fn(student, teacher, teacher_vocab=v_t, **common)
        (got_grad,) = torch.autograd.grad(got, student)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


def test_topk_forms_mask_rows_and_refuse_bad_arguments():
    student, _, teacher, _ = _case(4, 20, 50, 5, seed=1)
    mask = torch.tensor([True, False, True, True])
    each = uld_topk(student, teacher, teacher_vocab=50, reduction="none")
    assert uld_topk(student, teacher, teacher_vocab=50, mask=mask).item() == pytest.approx(
        each[mask].mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="teacher_vocab"):
        uld_topk(student, teacher, teacher_vocab=3)
    with pytest.raises(ValueError, match="row shape"):
        uld_topk(student[:2], teacher, teacher_vocab=50)
    with pytest.raises(ValueError, match="teacher id is outside"):
        gold_topk(student, teacher, teacher_vocab=50, matched_ids=torch.tensor([[70, 1]]))
