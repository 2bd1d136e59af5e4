"""Tests for potstill.losses against independent float64 references written here."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from potstill.losses import (
    OBJECTIVES,
    embedding_cosine,
    embedding_mse,
    forward_kl,
    generalized_jsd,
    get_objective,
    js_divergence,
    listwise_kl,
    margin_mse,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    soft_cross_entropy,
    tvd,
)

DIVERGENCES = {
    "forward_kl": (forward_kl, {}),
    "reverse_kl": (reverse_kl, {}),
    "soft_cross_entropy": (soft_cross_entropy, {}),
    "generalized_jsd": (generalized_jsd, {"beta": 0.3}),
    "js_divergence": (js_divergence, {}),
    "skew_kl": (skew_kl, {"alpha": 0.2}),
    "skew_reverse_kl": (skew_reverse_kl, {"alpha": 0.2}),
    "tvd": (tvd, {}),
}
NAMES = list(DIVERGENCES)
REDUCTIONS = ["mean", "sum", "none"]
SHAPES = [(6, 11), (3, 5, 17), (23,)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def reference_rows(name: str, s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0, **kw) -> torch.Tensor:
    """Per-row divergence in float64 from plain softmax / log."""
    p_s = torch.softmax(s.double() / temperature, -1)
    p_t = torch.softmax(t.double() / temperature, -1)
    if name == "forward_kl":
        return _kl(p_t, p_s)
    if name == "reverse_kl":
        return _kl(p_s, p_t)
    if name == "soft_cross_entropy":
        return -(p_t * p_s.log()).sum(-1)
    if name == "generalized_jsd":
        beta = kw.get("beta", 0.5)
        if beta == 0:
            return _kl(p_t, p_s)
        if beta == 1:
            return _kl(p_s, p_t)
        m = beta * p_t + (1 - beta) * p_s
        return beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)
    if name == "js_divergence":
        m = (p_t + p_s) / 2
        return 0.5 * _kl(p_t, m) + 0.5 * _kl(p_s, m)
    if name == "skew_kl":
        alpha = kw.get("alpha", 0.1)
        return _kl(p_t, alpha * p_t + (1 - alpha) * p_s)
    if name == "skew_reverse_kl":
        alpha = kw.get("alpha", 0.1)
        return _kl(p_s, (1 - alpha) * p_t + alpha * p_s)
    if name == "tvd":
        return 0.5 * (p_t - p_s).abs().sum(-1)
    raise AssertionError(name)


def reference_reduce(rows: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    keep = torch.ones_like(rows, dtype=torch.bool) if mask is None else mask
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / keep.sum().clamp_min(1)


def logits_pair(shape, seed=0, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * scale).to(dtype)
    t = (torch.randn(shape, generator=g) * scale).to(dtype)
    return s, t


def random_mask(row_shape, seed=1, p=0.6):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(row_shape, generator=g) < p
    if mask.dim():
        mask.view(-1)[0] = True
    return mask


def close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


# --- divergences: values -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_divergence_matches_reference(name, shape, reduction):
    fn, kw = DIVERGENCES[name]
    s, t = logits_pair(shape)
    for temperature in (1.0, 2.5):
        for mask in (None, random_mask(shape[:-1])):
            got = fn(s, t, temperature=temperature, mask=mask, reduction=reduction, **kw)
            want = reference_reduce(reference_rows(name, s, t, temperature, **kw), mask, reduction)
            assert got.dtype == torch.float32
            assert got.shape == want.shape
            close(got, want)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_student_gradient_matches_float64_reference(name, reduction):
    """With a constant teacher the divergences take their closed-form student gradient: it equals autograd
    through the float64 reference, for several β / α, temperatures, masks and per-row weights."""
    fn, kw = DIVERGENCES[name]
    params = [kw] + ([{"beta": 0.7}, {"beta": 0.05}] if name == "generalized_jsd" else []) + (
        [{"alpha": 0.6}] if name.startswith("skew") else [])
    s, t = logits_pair((4, 6, 13), seed=3, scale=3.0)
    mask = random_mask((4, 6), seed=4)
    weights = torch.rand(4, 6, generator=torch.Generator().manual_seed(5)) + 0.5
    for kw in params:
        for temperature in (1.0, 1.7):
            s_ = s.clone().requires_grad_(True)
            got = fn(s_, t, temperature=temperature, mask=mask, reduction=reduction, **kw)
            (g_got,) = torch.autograd.grad((got * weights).sum() if reduction == "none" else got, s_)
            s64 = s.double().requires_grad_(True)
            want = reference_reduce(reference_rows(name, s64, t, temperature, **kw), mask, reduction)
            (g_want,) = torch.autograd.grad((want * weights).sum() if reduction == "none" else want, s64)
            close(got, want)
            close(g_got, g_want, rtol=1e-4, atol=1e-7)
            assert (g_got[~mask] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_closed_form_gradient_equals_autograd_through_the_formula(name):
    """The closed form (teacher constant) and autograd through the same float32 formula (used when the teacher
    needs a gradient too) give the same student gradient, including at classes where both sides are -inf."""
    fn, kw = DIVERGENCES[name]
    s, t = logits_pair((5, 9), seed=6)
    s[:, -2:] = -math.inf
    t[:, -2:] = -math.inf
    s1, s2, t2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(fn(s1, t, **kw), s1)
    g2, _ = torch.autograd.grad(fn(s2, t2, **kw), (s2, t2))
    # float32 rounding of the autograd path scales with the largest gradient entries, not with each element
    # (reverse_kl on AVX-512: 3e-8 off at an element of 2e-4, where the largest entry is 0.18)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6 * g2.abs().max().item())
    assert torch.isfinite(g1).all() and (g1[:, -2:] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_nonnegative_and_zero_at_match(name):
    fn, kw = DIVERGENCES[name]
    s, t = logits_pair((4, 6, 31), seed=3)
    assert (fn(s, t, reduction="none", **kw) >= 0).all()
    same = fn(s, s.clone(), reduction="none", **kw)
    if name == "soft_cross_entropy":
        close(same, -(torch.softmax(s.double(), -1) * torch.log_softmax(s.double(), -1)).sum(-1))
    else:
        close(same, torch.zeros_like(same), atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_temperature_divides_both_logits(name):
    fn, kw = DIVERGENCES[name]
    s, t = logits_pair((5, 13), seed=4)
    close(fn(s, t, temperature=4.0, **kw), fn(s / 4.0, t / 4.0, **kw))
    assert not torch.allclose(fn(s, t, temperature=4.0, **kw), fn(s, t, **kw))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_scale_t2(name, reduction):
    fn, kw = DIVERGENCES[name]
    s, t = logits_pair((5, 13), seed=5)
    plain = fn(s, t, temperature=3.0, reduction=reduction, **kw)
    close(fn(s, t, temperature=3.0, reduction=reduction, scale_t2=True, **kw), plain * 9.0)


def test_forward_kl_matches_kldivloss_batchmean_times_t2():
    s, t = logits_pair((16, 10), seed=6)
    for temperature in (1.0, 4.0):
        want = (
            torch.nn.KLDivLoss(reduction="batchmean")(
                torch.log_softmax(s / temperature, -1), torch.softmax(t / temperature, -1)
            )
            * temperature**2
        )
        close(forward_kl(s, t, temperature=temperature, scale_t2=True), want)


def test_soft_cross_entropy_minus_forward_kl_is_teacher_entropy():
    s, t = logits_pair((3, 7, 19), seed=7)
    p_t = torch.softmax(t.double(), -1)
    entropy = -(p_t * p_t.log()).sum(-1)
    diff = soft_cross_entropy(s, t, reduction="none") - forward_kl(s, t, reduction="none")
    close(diff, entropy)


def test_generalized_jsd_endpoints_are_forward_and_reverse_kl_exactly():
    s, t = logits_pair((4, 9, 21), seed=8)
    for reduction in REDUCTIONS:
        assert torch.equal(generalized_jsd(s, t, beta=0.0, reduction=reduction), forward_kl(s, t, reduction=reduction))
        assert torch.equal(generalized_jsd(s, t, beta=1.0, reduction=reduction), reverse_kl(s, t, reduction=reduction))


def test_generalized_jsd_half_is_symmetric_and_bounded():
    s, t = logits_pair((8, 30), seed=9)
    a = generalized_jsd(s, t, reduction="none")
    close(a, generalized_jsd(t, s, reduction="none"))
    assert (a <= math.log(2) + 1e-6).all()


def test_skew_endpoints():
    s, t = logits_pair((5, 3, 12), seed=10)
    close(skew_kl(s, t, alpha=0.0, reduction="none"), forward_kl(s, t, reduction="none"))
    close(skew_reverse_kl(s, t, alpha=0.0, reduction="none"), reverse_kl(s, t, reduction="none"))
    for fn in (skew_kl, skew_reverse_kl):
        out = fn(s, t, alpha=1.0, reduction="none")
        close(out, torch.zeros_like(out))


def test_tvd_is_bounded_by_one():
    s, t = logits_pair((10, 40), seed=11, scale=20.0)
    out = tvd(s, t, reduction="none")
    assert ((out >= 0) & (out <= 1 + 1e-6)).all()


# --- masks and labels ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_masked_rows_do_not_count_and_get_no_gradient(name, chunk_size):
    fn, kw = DIVERGENCES[name]
    s, t = logits_pair((3, 7, 15), seed=12)
    mask = random_mask((3, 7), seed=13)
    clean = fn(s, t, mask=mask, **kw)
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[~mask] = 1e4
    t_bad[~mask] = -3e4
    s_bad[~mask, 0] = float("-inf")
    t_bad[~mask, 1] = float("-inf")
    s_bad[~mask, 2] = float("nan")
    s_bad.requires_grad_(True)
    for reduction in REDUCTIONS:
        out = fn(s_bad, t_bad, mask=mask, reduction=reduction, chunk_size=chunk_size, **kw)
        assert torch.isfinite(out).all()
        if reduction == "none":
            assert (out[~mask] == 0).all()
        (grad,) = torch.autograd.grad(out.sum(), s_bad)
        assert torch.isfinite(grad).all()
        assert (grad[~mask] == 0).all()
    close(fn(s_bad.detach(), t_bad, mask=mask, chunk_size=chunk_size, **kw), clean)


@pytest.mark.parametrize("name", NAMES)
def test_labels_minus_100_equal_mask(name):
    fn, kw = DIVERGENCES[name]
    s, t = logits_pair((4, 6, 10), seed=14)
    mask = random_mask((4, 6), seed=15)
    labels = torch.randint(0, 10, (4, 6)).masked_fill(~mask, -100)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(
            fn(s, t, labels=labels, reduction=reduction, **kw), fn(s, t, mask=mask, reduction=reduction, **kw)
        )


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_all_masked_mean_is_zero_with_grad(name, chunk_size):
    fn, kw = DIVERGENCES[name]
    s, t = logits_pair((2, 5, 8), seed=16)
    s.requires_grad_(True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    out = fn(s, t, mask=mask, chunk_size=chunk_size, **kw)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert (s.grad == 0).all()
    assert fn(s, t, mask=mask, reduction="sum", **kw).item() == 0.0
    assert (fn(s, t, mask=mask, reduction="none", **kw) == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_shared_minus_inf_classes_are_dropped_cleanly(name):
    fn, kw = DIVERGENCES[name]
    s, t = logits_pair((4, 12), seed=17)
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[:, -3:] = float("-inf")
    t_inf[:, -3:] = float("-inf")
    s_inf.requires_grad_(True)
    for chunk_size in (None, 3):
        out = fn(s_inf, t_inf, reduction="none", chunk_size=chunk_size, **kw)
        close(out, reference_rows(name, s[:, :-3], t[:, :-3], **kw))
        (grad,) = torch.autograd.grad(out.sum(), s_inf)
        assert torch.isfinite(grad).all() and (grad[:, -3:] == 0).all()


# --- chunking ------------------------------------------------------------------------------------------


def _value_and_grads(fn, s, t, **kw):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    out = fn(s, t, **kw)
    weights = torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)
    s_grad, t_grad = torch.autograd.grad((out * weights).sum(), [s, t])
    return out, s_grad, t_grad


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_chunked_equals_unchunked(name, reduction, masked):
    fn, kw = DIVERGENCES[name]
    s, t = logits_pair((5, 7, 33), seed=18)
    mask = random_mask((5, 7), seed=19) if masked else None
    want = _value_and_grads(fn, s, t, mask=mask, reduction=reduction, temperature=1.5, **kw)
    for chunk_size in (4, 35, 1000):
        got = _value_and_grads(fn, s, t, mask=mask, reduction=reduction, temperature=1.5, chunk_size=chunk_size, **kw)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_chunked_student_only_grad(name):
    fn, kw = DIVERGENCES[name]
    s, t = logits_pair((9, 20), seed=20)
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    fn(s1, t, **kw).backward()
    fn(s2, t, chunk_size=2, **kw).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-6, atol=1e-7)
    assert t.grad is None


@pytest.mark.parametrize("name", NAMES)
def test_chunked_bf16(name):
    fn, kw = DIVERGENCES[name]
    s, t = logits_pair((3, 6, 40), seed=21, dtype=torch.bfloat16)
    mask = random_mask((3, 6), seed=22)
    want = _value_and_grads(fn, s, t, mask=mask, **kw)
    got = _value_and_grads(fn, s, t, mask=mask, chunk_size=5, **kw)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    close(want[0], reference_reduce(reference_rows(name, s, t, **kw), mask, "mean"))


@pytest.mark.parametrize("name", NAMES)
def test_bf16_input_gives_float32_output(name):
    fn, kw = DIVERGENCES[name]
    s, t = logits_pair((4, 16), seed=23, dtype=torch.bfloat16)
    for reduction in REDUCTIONS:
        assert fn(s, t, reduction=reduction, **kw).dtype == torch.float32


def test_non_contiguous_input():
    s, t = logits_pair((6, 4, 10), seed=24)
    s_t, t_t = s.transpose(0, 1), t.transpose(0, 1)
    want = reference_rows("generalized_jsd", s_t, t_t, beta=0.5)
    close(generalized_jsd(s_t, t_t, reduction="none"), want)
    close(generalized_jsd(s_t, t_t, reduction="none", chunk_size=5), want)


# --- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_divergence_errors(name):
    fn, kw = DIVERGENCES[name]
    s, t = logits_pair((4, 5, 6))
    with pytest.raises(ValueError, match="reduction"):
        fn(s, t, reduction="batchmean", **kw)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            fn(s, t, temperature=bad, **kw)
    with pytest.raises(ValueError, match=r"\(4, 5, 6\).*\(4, 5, 7\)"):
        fn(s, torch.randn(4, 5, 7), **kw)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 6\)"):
        fn(s, t, mask=torch.ones(4, 6, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match="labels"):
        fn(s, t, mask=torch.ones(4, 5, dtype=torch.bool), labels=torch.zeros(4, 5, dtype=torch.long), **kw)
    with pytest.raises(ValueError, match="chunk_size"):
        fn(s, t, chunk_size=0, **kw)


def test_weight_errors():
    s, t = logits_pair((2, 3))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="beta"):
            generalized_jsd(s, t, beta=bad)
        with pytest.raises(ValueError, match="alpha"):
            skew_kl(s, t, alpha=bad)
        with pytest.raises(ValueError, match="alpha"):
            skew_reverse_kl(s, t, alpha=bad)


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


# --- embeddings ----------------------------------------------------------------------------------------


def test_embedding_mse():
    s, t = logits_pair((10, 24), seed=40)
    close(embedding_mse(s, t), F.mse_loss(s, t))
    close(embedding_mse(s, t, reduction="none"), ((s - t) ** 2).mean(-1))
    close(embedding_mse(s, t, reduction="sum"), ((s - t) ** 2).mean(-1).sum())
    close(embedding_mse(s, t, normalize=True), F.mse_loss(F.normalize(s, dim=-1), F.normalize(t, dim=-1)))
    mask = random_mask((10,), seed=41)
    close(embedding_mse(s, t, mask=mask), F.mse_loss(s[mask], t[mask]))
    s3, t3 = logits_pair((2, 5, 8), seed=42)
    close(embedding_mse(s3, t3), F.mse_loss(s3, t3))
    assert embedding_mse(s.bfloat16(), t.bfloat16()).dtype == torch.float32


def test_embedding_cosine():
    s, t = logits_pair((10, 24), seed=43)
    rows = 1 - F.cosine_similarity(s.double(), t.double(), dim=-1)
    close(embedding_cosine(s, t, reduction="none"), rows)
    close(embedding_cosine(s, t), rows.mean())
    close(embedding_cosine(s, t, reduction="sum"), rows.sum())
    close(embedding_cosine(s, s.clone() * 3.0), torch.tensor(0.0), atol=1e-6)
    mask = random_mask((10,), seed=44)
    close(embedding_cosine(s, t, mask=mask), rows[mask].mean())


def test_embedding_errors():
    s = torch.randn(4, 8)
    for fn in (embedding_mse, embedding_cosine):
        with pytest.raises(ValueError, match="projection"):
            fn(s, torch.randn(4, 16))
        with pytest.raises(ValueError, match=r"\(4, 8\).*\(5, 8\)"):
            fn(s, torch.randn(5, 8))
        with pytest.raises(ValueError, match="reduction"):
            fn(s, s, reduction="max")


# --- catalogue -----------------------------------------------------------------------------------------


def test_catalogue_entries():
    hidden = {"hidden_mse", "hidden_cosine", "squarehead", "dmae_align", "mi_alpha"}
    attention = {"attention_kl", "minilm_relations", "attention_mse"}
    stateful = {"taid", "sparse_flops", "moe_router_aux"} | hidden | attention
    logits = set(NAMES) | {"taid", "sinkhorn", "uld", "gold"}
    scores = {"margin_mse", "listwise_kl", "in_batch_margin_mse", "pointwise_mse", "sparse_flops"}
    embedding = {"embedding_mse", "embedding_cosine", "embedding_similarity_kl"}
    preference = {"dpo_teacher_ref"}
    router = {"moe_router_aux"}
    expected = logits | hidden | attention | scores | embedding | preference | router
    assert set(OBJECTIVES) == expected
    for name, info in OBJECTIVES.items():
        assert info.name == name
        assert info.stateful == (name in stateful)
        assert info.stateful or info.fn.__name__ == name
        assert callable(info.fn)
        assert info.formula and "\n" not in info.formula
        assert info.paper
        params = inspect.signature(info.fn).parameters
        assert all(params[k].default == v for k, v in info.defaults.items())
    kinds = {name: info.kind for name, info in OBJECTIVES.items()}
    assert {k for k, v in kinds.items() if v == "logits"} == logits
    assert {k for k, v in kinds.items() if v == "scores"} == scores
    assert {k for k, v in kinds.items() if v == "embedding"} == embedding
    assert {k for k, v in kinds.items() if v == "hidden_states"} == hidden
    assert {k for k, v in kinds.items() if v == "attention"} == attention
    assert {k for k, v in kinds.items() if v == "preference"} == preference
    assert {k for k, v in kinds.items() if v == "router"} == router
    assert OBJECTIVES["generalized_jsd"].defaults["beta"] == 0.5


def test_get_objective():
    assert get_objective("tvd").fn is tvd
    with pytest.raises(KeyError, match="did you mean.*forward_kl") as info:
        get_objective("forward_kld")
    assert "reverse_kl" in str(info.value)
    with pytest.raises(KeyError, match="valid names"):
        get_objective("zzz")


def test_every_objective_trains_on_an_inference_mode_teacher():
    """The loop hands the teacher's outputs over as `torch.inference_mode` tensors, with no copy: no objective
    may save them for backward (chunked, sparse and fused paths included)."""
    import inspect as _inspect

    from potstill.losses import TopKTeacher, fused_linear_divergence, sparse_version
    from potstill.losses.intermediate import ModelShape

    g = torch.Generator().manual_seed(0)
    shapes = {"logits": (3, 5, 11), "preference": (4, 5, 11), "embedding": (6, 8), "scores": (4, 3)}
    for name, info in OBJECTIVES.items():
        if name in ("sparse_flops", "moe_router_aux"):  # regularisers of the student alone: no teacher output
            continue
        if info.kind in ("hidden_states", "attention"):  # internals: per layer [B, T, D] tensors
            obj = info.fn()
            obj.bind(ModelShape(2, 8, 2), ModelShape(4, 16, 2))
            with torch.inference_mode():
                if info.kind == "hidden_states":
                    teacher = [torch.randn(2, 5, 16, generator=g) for _ in range(5)]
                else:
                    teacher = {i: tuple(torch.randn(2, 5, 16, generator=g) for _ in range(3)) for i in range(4)}
            if info.kind == "hidden_states":
                student = [torch.randn(2, 5, 8, generator=g).requires_grad_(True) for _ in range(3)]
                leaves = student
            else:
                student = {i: tuple(torch.randn(2, 5, 8, generator=g).requires_grad_(True) for _ in range(3))
                           for i in range(2)}
                leaves = [x for v in student.values() for x in v]
            obj(student, teacher, mask=torch.ones(2, 5, dtype=torch.bool)).backward()
            assert any(x.grad is not None for x in leaves), name
            continue
        shape = shapes[info.kind]
        with torch.inference_mode():
            teacher = torch.randn(shape, generator=g)
            extra = torch.randn(shape[0], generator=g)
        accepts_chunks = "chunk_size" in _inspect.signature(info.fn).parameters
        for chunk_size in (None, 4) if accepts_chunks else (None,):
            s = torch.randn(shape, generator=g).requires_grad_(True)
            kw = {"chunk_size": chunk_size} if chunk_size else {}
            fn = info.fn(**kw) if info.stateful else info.fn  # a stateful objective takes it when built
            if name == "margin_mse":
                out = fn(s[:, 0], s[:, 1:], extra, teacher[:, 1:])
            elif name == "in_batch_margin_mse":  # a square (B, B) in-batch matrix
                out = fn(s[:3], teacher[:3])
            elif info.kind == "preference":  # chosen rows, then rejected rows, scored at their token ids
                out = fn(s, teacher, labels=torch.randint(0, shape[-1], shape[:-1], generator=g))
            else:
                out = fn(s, teacher) if info.stateful else fn(s, teacher, **kw)
            out.backward()
            assert torch.isfinite(s.grad).all(), name
        if sparse_version(name) is not None:
            with torch.inference_mode():
                lp, ids = torch.log_softmax(teacher, -1).topk(4, -1)
                cached = TopKTeacher(ids, lp)
            for chunk_size in (None, 4):
                s = torch.randn(shape, generator=g).requires_grad_(True)
                sparse_version(name)(s, cached, chunk_size=chunk_size).backward()
                assert torch.isfinite(s.grad).all(), name
            h = torch.randn(3, 5, 7, generator=g).requires_grad_(True)
            w = torch.randn(11, 7, generator=g).requires_grad_(True)
            for target in (teacher, cached):
                fused_linear_divergence(h, w, target, divergence=name, chunk_size=4).backward()
            assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all(), name
