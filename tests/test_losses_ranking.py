"""Ranking losses, sparse-retriever regularisers and the min-max teacher ensemble, against references
written here (plain loops / the peers' published formulas)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_losses import _kl, logits_pair, random_mask

from potstill.losses.catalogue import OBJECTIVES
from potstill.losses.ranking import (
    flops,
    idf_flops,
    in_batch_margin_mse,
    listwise_kl,
    margin_mse,
    pointwise_mse,
)
from potstill.teachers.ensemble import minmax_ensemble, minmax_normalize

pytestmark = pytest.mark.usefixtures("one_thread")


def close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(b).double(), rtol=rtol, atol=atol)


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# --- margin_mse (existing) -----------------------------------------------------------------------------


@pytest.mark.parametrize("n_neg", [None, 4])
def test_margin_mse_is_invariant_to_a_shift_of_all_teacher_or_all_student_scores(n_neg):
    neg_shape = (6,) if n_neg is None else (6, n_neg)
    sp, tp = randn(6, seed=1), randn(6, seed=2, scale=5)
    sn, tn = randn(*neg_shape, seed=3), randn(*neg_shape, seed=4, scale=5)
    base = margin_mse(sp, sn, tp, tn)
    assert base > 0.1
    close(margin_mse(sp, sn, tp + 7.5, tn + 7.5), base)
    close(margin_mse(sp - 3.0, sn - 3.0, tp, tn), base)
    # a per-query shift of the student is free too, but a scale is not
    shift = randn(6, seed=5)
    shift_neg = shift if n_neg is None else shift[:, None]
    close(margin_mse(sp + shift, sn + shift_neg, tp, tn), base)
    assert not torch.isclose(margin_mse(sp, sn, 2 * tp, 2 * tn), base)


def test_margin_mse_is_zero_iff_student_is_teacher_plus_a_per_query_shift():
    tp, tn = randn(5, seed=6), randn(5, 3, seed=7)
    c = randn(5, seed=8)
    assert margin_mse(tp + c, tn + c[:, None], tp, tn) < 1e-10
    assert margin_mse(tp + c, tn + c[:, None] + 0.1 * randn(5, 3, seed=9), tp, tn) > 1e-4


# --- in_batch_margin_mse -------------------------------------------------------------------------------


def _in_batch_reference(s, t, sn=None, tn=None, pairs=None):
    """Per-query values by plain loops over j ≠ i (float64)."""
    b = s.shape[0]
    out = []
    for i in range(b):
        terms_p, terms_n = [], []
        for j in range(b):
            if j == i or (pairs is not None and not pairs[i, j]):
                continue
            terms_p.append(((s[i, i] - s[i, j]) - (t[i, i] - t[i, j])).double() ** 2)
            if sn is not None:
                terms_n.append(((s[i, i] - sn[i, j]) - (t[i, i] - tn[i, j])).double() ** 2)
        if not terms_p:
            out.append(torch.tensor(float("nan"), dtype=torch.float64))
            continue
        value = torch.stack(terms_p).mean()
        if sn is not None:
            value = 0.5 * value + 0.5 * torch.stack(terms_n).mean()
        out.append(value)
    return torch.stack(out)


def test_in_batch_margin_mse_matches_the_loop_reference_and_the_official_flat_form():
    s, t = randn(5, 5, seed=10), randn(5, 5, seed=11, scale=4)
    rows = _in_batch_reference(s, t)
    close(in_batch_margin_mse(s, t, reduction="none"), rows)
    close(in_batch_margin_mse(s, t), rows.mean())
    close(in_batch_margin_mse(s, t, reduction="sum"), rows.sum())
    # matchmaker's form: diagonal expanded over the B−1 off-diagonal entries, one MSE over B·(B−1) terms
    off = ~torch.eye(5, dtype=torch.bool)
    s_own = s.diagonal().unsqueeze(-1).expand(-1, 4).reshape(-1)
    t_own = t.diagonal().unsqueeze(-1).expand(-1, 4).reshape(-1)
    close(in_batch_margin_mse(s, t), F.mse_loss(s_own - s[off], t_own - t[off]))


def test_in_batch_margin_mse_with_negatives_is_half_and_half_without_the_negative_diagonal():
    s, t = randn(4, 4, seed=12), randn(4, 4, seed=13, scale=3)
    sn, tn = randn(4, 4, seed=14), randn(4, 4, seed=15, scale=3)
    rows = _in_batch_reference(s, t, sn, tn)
    close(in_batch_margin_mse(s, t, sn, tn, reduction="none"), rows)
    close(in_batch_margin_mse(s, t, sn, tn), rows.mean())
    # the hard-negative diagonal (each query's own negative) does not count
    sn2 = sn.clone()
    sn2.diagonal().add_(100.0)
    close(in_batch_margin_mse(s, t, sn2, tn), rows.mean())
    assert not torch.isclose(in_batch_margin_mse(s, t, sn, tn), in_batch_margin_mse(s, t))


def test_in_batch_margin_mse_is_invariant_to_a_shift_of_all_teacher_or_all_student_scores():
    s, t = randn(6, 6, seed=16), randn(6, 6, seed=17, scale=4)
    sn, tn = randn(6, 6, seed=18), randn(6, 6, seed=19, scale=4)
    for negs in ((), (sn, tn)):
        base = in_batch_margin_mse(s, t, *negs)
        assert base > 0.1
        shifted_t = (t + 11.0, *(x + 11.0 for x in negs[1:]))
        close(in_batch_margin_mse(s, shifted_t[0], *negs[:1], *shifted_t[1:]), base, rtol=1e-4)
        shifted_s = [x - 2.5 for x in (s, *negs[:1])]
        close(in_batch_margin_mse(shifted_s[0], t, *shifted_s[1:], *negs[1:]), base, rtol=1e-4)
        assert not torch.isclose(in_batch_margin_mse(s, 3 * t, *negs[:1], *(3 * x for x in negs[1:])), base)


def test_in_batch_margin_mse_masks():
    s, t = randn(6, 6, seed=20), randn(6, 6, seed=21)
    pairs = torch.rand(6, 6, generator=torch.Generator().manual_seed(22)) < 0.6
    pairs[2] = False  # query 2 has no counted pair: not counted
    pairs[0, 1] = True
    rows = _in_batch_reference(s, t, pairs=pairs)
    counted = ~rows.isnan()
    close(in_batch_margin_mse(s, t, mask=pairs), rows[counted].mean())
    close(in_batch_margin_mse(s, t, mask=pairs, reduction="none"), torch.where(counted, rows, 0.0))
    # a (B,) item mask equals the loss on the sub-batch of valid items
    items = torch.tensor([True, False, True, True, False, True])
    sub = items.nonzero().squeeze(1)
    close(in_batch_margin_mse(s, t, mask=items), in_batch_margin_mse(s[sub][:, sub], t[sub][:, sub]))
    # garbage in masked entries leaks into neither the value nor the gradient
    s_bad = s.clone()
    s_bad[1, :] = float("nan")
    s_bad[:, 4] = float("inf")
    s_bad = s_bad.requires_grad_(True)
    close(in_batch_margin_mse(s_bad, t, mask=items), in_batch_margin_mse(s[sub][:, sub], t[sub][:, sub]))
    in_batch_margin_mse(s_bad, t, mask=items).backward()
    assert torch.isfinite(s_bad.grad).all()
    assert (s_bad.grad[1] == 0).all() and (s_bad.grad[:, 4] == 0).all()


def test_in_batch_margin_mse_gradient_and_degenerate_batches():
    s = randn(4, 4, seed=23).requires_grad_(True)
    t = randn(4, 4, seed=24)
    in_batch_margin_mse(s, t).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    one = torch.zeros(1, 1, requires_grad=True)
    loss = in_batch_margin_mse(one, torch.zeros(1, 1))
    assert loss.item() == 0.0
    loss.backward()
    assert in_batch_margin_mse(s.bfloat16(), t.bfloat16()).dtype == torch.float32


def test_in_batch_margin_mse_errors():
    s = randn(4, 4)
    with pytest.raises(ValueError, match="square"):
        in_batch_margin_mse(randn(4, 3), randn(4, 3))
    with pytest.raises(ValueError, match="same shape"):
        in_batch_margin_mse(s, randn(3, 3))
    with pytest.raises(ValueError, match="both"):
        in_batch_margin_mse(s, s, s)
    with pytest.raises(ValueError, match="negative scores"):
        in_batch_margin_mse(s, s, randn(4, 5), randn(4, 5))
    with pytest.raises(ValueError, match="mask must have shape"):
        in_batch_margin_mse(s, s, mask=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        in_batch_margin_mse(s, s, mask=torch.ones(4))
    with pytest.raises(ValueError, match="reduction"):
        in_batch_margin_mse(s, s, reduction="batchmean")


# --- listwise_kl against sentence-transformers and Tevatron -----------------------------------------------


def _st_distill_kl(student, teacher, temperature):
    """sentence-transformers DistillKLDivLoss: KLDivLoss(batchmean)(log_softmax(s/T), softmax(t/T)) · T²."""
    log_p_s = torch.log_softmax(student / temperature, dim=1)
    p_t = torch.softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature**2


def _tevatron_distil(student, teacher, temperature):
    """Tevatron DistilTevatronTrainer: kl_div(log_softmax(s/T), softmax(t/T), batchmean), no T²."""
    return F.kl_div(torch.log_softmax(student.float() / temperature, dim=1),
                    torch.softmax(teacher.float() / temperature, dim=1), reduction="batchmean")


def test_listwise_kl_equals_sentence_transformers_distill_kl_div():
    s, t = randn(8, 5, seed=25, scale=3), randn(8, 5, seed=26, scale=3)
    close(listwise_kl(s, t), _st_distill_kl(s, t, 1.0))  # T = 1: T² = 1, the default of both
    # ST always multiplies by T²; here that is scale_t2=True
    close(listwise_kl(s, t, temperature=2.0, scale_t2=True), _st_distill_kl(s, t, 2.0))
    assert not torch.isclose(listwise_kl(s, t, temperature=2.0), _st_distill_kl(s, t, 2.0))


def test_listwise_kl_equals_tevatron_distillation():
    s, t = randn(8, 5, seed=27, scale=0.05), randn(8, 5, seed=28, scale=0.05)
    close(listwise_kl(s, t), _tevatron_distil(s, t, 1.0))
    close(listwise_kl(s, t, temperature=0.02), _tevatron_distil(s, t, 0.02), rtol=1e-4)


# --- pointwise_mse -------------------------------------------------------------------------------------


def test_pointwise_mse_values():
    s, t = randn(6, 4, seed=29), randn(6, 4, seed=30)
    assert pointwise_mse(t, t) == 0.0
    assert pointwise_mse(s, t) > 0.1
    close(pointwise_mse(s, t), F.mse_loss(s, t))
    close(pointwise_mse(s, t, reduction="none"), ((s - t) ** 2).mean(-1))
    close(pointwise_mse(s, t, reduction="sum"), ((s - t) ** 2).mean(-1).sum())
    close(pointwise_mse(s[:, 0], t[:, 0]), F.mse_loss(s[:, 0], t[:, 0]))
    # unlike margin_mse, a shift is not free
    assert pointwise_mse(t + 1.0, t) == pytest.approx(1.0)


def test_pointwise_mse_masks():
    s, t = randn(5, 4, seed=31), randn(5, 4, seed=32)
    valid = torch.rand(5, 4, generator=torch.Generator().manual_seed(33)) < 0.6
    valid[0, 0], valid[3] = True, False
    sq = (s - t) ** 2
    rows = torch.stack([sq[i, valid[i]].mean() if valid[i].any() else torch.tensor(0.0) for i in range(5)])
    counted = valid.any(-1)
    close(pointwise_mse(s, t, mask=valid), rows[counted].mean())
    close(pointwise_mse(s, t, mask=valid, reduction="none"), rows)
    queries = torch.tensor([True, False, True, True, False])
    close(pointwise_mse(s, t, mask=queries), sq.mean(-1)[queries].mean())
    s_bad = s.masked_fill(~valid, float("nan")).requires_grad_(True)
    pointwise_mse(s_bad, t, mask=valid).backward()
    assert torch.isfinite(s_bad.grad).all() and (s_bad.grad[~valid] == 0).all()
    empty = pointwise_mse(s, t, mask=torch.zeros(5, 4, dtype=torch.bool))
    assert empty.item() == 0.0


def test_pointwise_mse_errors():
    with pytest.raises(ValueError, match="same shape"):
        pointwise_mse(randn(3, 4), randn(3, 5))
    with pytest.raises(ValueError, match=r"\(B,\) or \(B, N\)"):
        pointwise_mse(randn(2, 3, 4), randn(2, 3, 4))
    with pytest.raises(ValueError, match="mask must have shape"):
        pointwise_mse(randn(3, 4), randn(3, 4), mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduction"):
        pointwise_mse(randn(3, 4), randn(3, 4), reduction="avg")


# --- flops / idf_flops ---------------------------------------------------------------------------------


def test_flops_matches_a_hand_computation_and_its_gradient():
    w = torch.tensor([[0.0, 1.0, 2.0, 0.0], [3.0, 0.0, 2.0, 0.0]])
    # mean |w_j| over the 2 rows: [1.5, 0.5, 2.0, 0.0] -> 2.25 + 0.25 + 4 + 0
    assert flops(w).item() == pytest.approx(6.5)
    x = w.clone().requires_grad_(True)
    flops(x).backward()
    mean = w.abs().mean(0)
    close(x.grad, 2 * mean * torch.sign(w) / 2)
    assert x.grad.abs().sum() > 0
    # leading axes are rows; signs do not matter
    close(flops(-w.reshape(2, 1, 4)), torch.tensor(6.5))


def test_flops_mask_and_empty():
    w = randn(6, 10, seed=34).relu()
    rows = torch.tensor([True, False, True, True, False, True])
    close(flops(w, mask=rows), flops(w[rows]))
    bad = w.clone()
    bad[~rows] = float("nan")
    bad.requires_grad_(True)
    value = flops(bad, mask=rows)
    close(value, flops(w[rows]))
    value.backward()
    assert torch.isfinite(bad.grad).all() and (bad.grad[~rows] == 0).all()
    assert flops(w, mask=torch.zeros(6, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="activations"):
        flops(torch.ones(5))
    with pytest.raises(ValueError, match="mask must have shape"):
        flops(w, mask=torch.ones(5, dtype=torch.bool))


def test_idf_flops_weights_each_term_by_inverse_idf_squared():
    a = randn(5, 6, seed=35).relu() + 0.1
    idf = torch.tensor([0.5, 1.0, 2.0, 4.0, 1.5, 3.0])
    mean = a.abs().mean(0)
    close(idf_flops(a, idf), (mean**2 / idf**2).sum())
    # with idf = 1 everywhere it is plain FLOPS; on matching weights idf·w it is FLOPS of the raw weights w
    close(idf_flops(a, torch.ones(6)), flops(a))
    w = randn(5, 6, seed=36).relu()
    close(idf_flops(idf * w, idf), flops(w))
    # a term twice as rare pays a quarter of the penalty for the same matching weight
    only = torch.zeros(5, 6)
    only[:, 2] = a[:, 2]
    before = idf_flops(only, idf)
    idf2 = idf.clone()
    idf2[2] *= 2
    close(idf_flops(only, idf2), before / 4)
    assert not torch.isclose(idf_flops(a, idf), flops(a))


def test_idf_flops_ignores_terms_with_no_positive_idf_and_gets_gradients():
    a = randn(4, 5, seed=37).relu() + 0.1
    idf = torch.tensor([1.0, 0.0, -2.0, 2.0, 1.0])
    keep = idf > 0
    close(idf_flops(a, idf), idf_flops(a[:, keep], idf[keep]))
    x = a.clone().requires_grad_(True)
    idf_flops(x, idf, mask=torch.tensor([True, True, False, True])).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[:, ~keep] == 0).all() and (x.grad[2] == 0).all() and x.grad[:, keep].abs().sum() > 0
    with pytest.raises(ValueError, match="idf must have shape"):
        idf_flops(a, torch.ones(4))


# --- minmax_ensemble -----------------------------------------------------------------------------------


def test_minmax_ensemble_values_are_the_mean_of_row_normalised_teachers_in_0_1():
    dense, sparse = randn(4, 6, seed=38, scale=0.2), randn(4, 6, seed=39, scale=40.0) + 100
    out = minmax_ensemble([dense, sparse])
    assert out.shape == (4, 6) and out.dtype == torch.float32
    assert (out >= 0).all() and (out <= 1).all()

    def norm(x):
        lo, hi = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
        return (x - lo) / (hi - lo)

    close(out, (norm(dense) + norm(sparse)) / 2)
    # the official code (+1e-6 in the range, ×scale) agrees up to that epsilon
    official = sum((x - x.min(1).values[:, None]) / (x.max(1).values - x.min(1).values + 1e-6)[:, None]
                   for x in (dense, sparse)) / 2 * 30
    close(minmax_ensemble([dense, sparse], scale=30.0), official, rtol=1e-4, atol=1e-3)
    # each row of each normalised teacher spans exactly [0, 1]
    one = minmax_ensemble([dense])
    close(one.min(-1).values, torch.zeros(4))
    close(one.max(-1).values, torch.ones(4))


def test_minmax_ensemble_is_invariant_to_a_positive_affine_change_of_one_teacher_per_query():
    a, b = randn(5, 7, seed=40), randn(5, 7, seed=41, scale=10)
    base = minmax_ensemble([a, b])
    scale = randn(5, 1, seed=42).abs() * 10 + 0.1
    offset = randn(5, 1, seed=43, scale=50)
    close(minmax_ensemble([a, b * scale + offset]), base, rtol=1e-4, atol=1e-5)
    close(minmax_ensemble([a * 3.0 - 1.0, b]), base, rtol=1e-4, atol=1e-5)
    # a negative scale flips the ranking and is not free
    assert not torch.allclose(minmax_ensemble([a, -b]), base)


def test_minmax_ensemble_ignores_masked_candidates():
    a, b = randn(3, 5, seed=44), randn(3, 5, seed=45)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 1]], dtype=torch.bool)
    out = minmax_ensemble([a, b], mask=valid)
    assert (out[~valid] == 0).all()
    for i in range(3):
        keep = valid[i]
        close(out[i, keep], minmax_ensemble([a[i, keep][None], b[i, keep][None]])[0])
    # anything in masked entries (huge values, ±inf, NaN) changes nothing
    a_bad = a.masked_fill(~valid, 1e9)
    b_bad = b.masked_fill(~valid, float("nan"))
    b_bad[0, 3] = float("-inf")
    close(minmax_ensemble([a_bad, b_bad], mask=valid), out)
    assert not torch.allclose(minmax_ensemble([a_bad, b]), out)


def test_minmax_ensemble_constant_rows_give_zero_without_nan():
    a = randn(3, 4, seed=46)
    a[1] = 2.5
    b = randn(3, 4, seed=47)
    b[1] = -1.0
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[2] = False
    out = minmax_ensemble([a, b], mask=valid)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all() and (out[2] == 0).all()
    assert (out[0] > 0).any()
    single = torch.tensor([[3.0], [4.0]])
    assert (minmax_normalize(single) == 0).all()


def test_minmax_ensemble_errors():
    with pytest.raises(ValueError, match="at least one teacher"):
        minmax_ensemble([])
    with pytest.raises(ValueError, match="same shape"):
        minmax_ensemble([randn(3, 4), randn(3, 5)])
    with pytest.raises(ValueError, match="mask must have"):
        minmax_ensemble([randn(3, 4)], mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="scalar"):
        minmax_normalize(torch.tensor(1.0))


# --- catalogue -----------------------------------------------------------------------------------------


def test_new_score_losses_are_catalogued_and_regularisers_are_not():
    for name, fn in (("in_batch_margin_mse", in_batch_margin_mse), ("pointwise_mse", pointwise_mse)):
        info = OBJECTIVES[name]
        assert info.fn is fn and info.kind == "scores" and not info.stateful
        assert info.formula and "\n" not in info.formula and info.paper
        assert info.defaults == {"reduction": "mean"}
    assert "flops" not in OBJECTIVES and "idf_flops" not in OBJECTIVES


# --- ranking -------------------------------------------------------------------------------------------


def test_margin_mse_single_negative():
    g = torch.Generator().manual_seed(30)
    sp, sn, tp, tn = (torch.randn(8, generator=g) for _ in range(4))
    per_query = ((sp - sn) - (tp - tn)) ** 2
    close(margin_mse(sp, sn, tp, tn, reduction="none"), per_query)
    close(margin_mse(sp, sn, tp, tn), per_query.mean())
    close(margin_mse(sp, sn, tp, tn, reduction="sum"), per_query.sum())
    close(margin_mse(sp, sn, tp, tn), F.mse_loss(sp - sn, tp - tn))


def test_margin_mse_many_negatives():
    g = torch.Generator().manual_seed(31)
    sp, tp = torch.randn(6, generator=g), torch.randn(6, generator=g)
    sn, tn = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    terms = ((sp[:, None] - sn) - (tp[:, None] - tn)) ** 2
    close(margin_mse(sp, sn, tp, tn, reduction="none"), terms.mean(-1))
    close(margin_mse(sp, sn, tp, tn), terms.mean())
    close(margin_mse(sp, sn, tp, tn, reduction="sum"), terms.mean(-1).sum())
    half = margin_mse(sp.bfloat16(), sn.bfloat16(), tp.bfloat16(), tn.bfloat16())
    assert half.dtype == torch.float32
    with pytest.raises(ValueError):
        margin_mse(sp, sn, tp, tn[:, :3])
    with pytest.raises(ValueError):
        margin_mse(sp, sn[:5], tp, tn[:5])
    with pytest.raises(ValueError, match="reduction"):
        margin_mse(sp, sn, tp, tn, reduction="avg")


def _listwise_reference(s, t, temperature, valid):
    rows = []
    for i in range(s.shape[0]):
        keep = valid[i]
        if keep.any():
            p_s = torch.softmax(s[i, keep].double() / temperature, -1)
            p_t = torch.softmax(t[i, keep].double() / temperature, -1)
            rows.append(_kl(p_t, p_s))
        else:
            rows.append(torch.tensor(0.0, dtype=torch.float64))
    return torch.stack(rows)


def test_listwise_kl():
    s, t = logits_pair((7, 9), seed=32)
    full = torch.ones(7, 9, dtype=torch.bool)
    for temperature in (1.0, 2.0):
        rows = _listwise_reference(s, t, temperature, full)
        close(listwise_kl(s, t, temperature=temperature, reduction="none"), rows)
        close(listwise_kl(s, t, temperature=temperature), rows.mean())
        close(listwise_kl(s, t, temperature=temperature, scale_t2=True), rows.mean() * temperature**2)


def test_listwise_kl_candidate_mask():
    s, t = logits_pair((7, 9), seed=33)
    valid = random_mask((7, 9), seed=34, p=0.7)
    valid[3] = False
    rows = _listwise_reference(s, t, 1.5, valid)
    counted = valid.any(-1)
    close(listwise_kl(s, t, temperature=1.5, mask=valid, reduction="none"), rows)
    close(listwise_kl(s, t, temperature=1.5, mask=valid), rows.sum() / counted.sum())
    s_grad = s.clone().requires_grad_(True)
    listwise_kl(s_grad, t, mask=valid).backward()
    assert torch.isfinite(s_grad.grad).all() and (s_grad.grad[~valid] == 0).all()


def test_listwise_kl_query_mask():
    s, t = logits_pair((7, 9), seed=35)
    queries = torch.tensor([True, False, True, True, False, True, True])
    rows = _listwise_reference(s, t, 1.0, torch.ones(7, 9, dtype=torch.bool))
    close(listwise_kl(s, t, mask=queries), rows[queries].mean())
    close(listwise_kl(s, t, mask=queries, reduction="none"), torch.where(queries, rows, 0.0))
