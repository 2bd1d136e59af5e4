"""Tests for potstill.losses against independent float64 references written here."""

from __future__ import annotations

import math

import pytest
import torch

from potstill.losses import (
    forward_kl,
    generalized_jsd,
    js_divergence,
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
