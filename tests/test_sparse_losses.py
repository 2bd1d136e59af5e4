"""Tests for potstill.losses.sparse: top-k divergences against the dense ones and a float64 bucket reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from potstill.losses.divergences import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    soft_cross_entropy,
    tvd,
)
from potstill.losses.sparse import (
    TAIL_MASS_FLOOR,
    TopKTeacher,
    sparse_forward_kl,
    sparse_generalized_jsd,
    sparse_reverse_kl,
    sparse_skew_kl,
    sparse_skew_reverse_kl,
    sparse_soft_cross_entropy,
    sparse_tvd,
    sparse_version,
    tail_from_logprobs,
)

CASES = {
    "forward_kl": (sparse_forward_kl, forward_kl, {}),
    "reverse_kl": (sparse_reverse_kl, reverse_kl, {}),
    "soft_cross_entropy": (sparse_soft_cross_entropy, soft_cross_entropy, {}),
    "generalized_jsd": (sparse_generalized_jsd, generalized_jsd, {"beta": 0.3}),
    "skew_kl": (sparse_skew_kl, skew_kl, {"alpha": 0.2}),
    "skew_reverse_kl": (sparse_skew_reverse_kl, skew_reverse_kl, {"alpha": 0.2}),
    "tvd": (sparse_tvd, tvd, {}),
}
NAMES = list(CASES)


pytestmark = pytest.mark.usefixtures("one_thread")


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


def top_k(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0, exact_tail: bool = True) -> TopKTeacher:
    """A TopKTeacher from dense teacher logits, with the exact tail computed in float64."""
    logp = F.log_softmax(teacher_logits.double() / temperature, -1)
    lp, ids = logp.topk(k, -1)
    tail = None
    if exact_tail:
        tail = logp.scatter(-1, ids, -math.inf).logsumexp(-1).float() if k < logp.shape[-1] else None
    return TopKTeacher(ids, lp.float(), tail)


def _mask(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) > 0.35
    m.view(-1)[0] = True
    return m


def _value_and_grad(fn, s, *args, **kw):
    s = s.detach().clone().requires_grad_(True)
    out = fn(s, *args, **kw)
    (out.sum() if out.dim() else out).backward()
    return out.detach(), s.grad


# --- k = V equals the dense divergences ---------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_full_vocab_equals_dense(name, temperature, reduction):
    sparse, dense, kw = CASES[name]
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 13) * 2, torch.randn(3, 4, 13) * 2
    mask = _mask((3, 4))
    teacher = top_k(t, 13, temperature)
    want = _value_and_grad(dense, s, t, temperature=temperature, mask=mask, reduction=reduction, **kw)
    for chunk_size in (None, 5):
        got = _value_and_grad(
            sparse, s, teacher, temperature=temperature, mask=mask, reduction=reduction, chunk_size=chunk_size, **kw
        )
        _close(got[0], want[0])
        _close(got[1], want[1])


@pytest.mark.parametrize("name", NAMES)
def test_full_vocab_with_given_empty_tail_equals_dense(name):
    sparse, dense, kw = CASES[name]
    torch.manual_seed(1)
    s, t = torch.randn(6, 9), torch.randn(6, 9)
    base = top_k(t, 9)
    teacher = TopKTeacher(base.ids, base.logprobs, torch.full((6,), -math.inf))
    _close(sparse(s, teacher, labels=torch.tensor([1, -100, 2, 3, -100, 4]), **kw),
           dense(s, t, labels=torch.tensor([1, -100, 2, 3, -100, 4]), **kw))


# --- k < V equals the float64 (k+1)-bucket reference --------------------------------------------------


def _kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def reference_rows(name, p, q, **kw):
    """Divergence over the last axis of float64 probability vectors p (teacher) and q (student)."""
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "soft_cross_entropy":
        return -(p * q.log()).sum(-1)
    if name == "generalized_jsd":
        b = kw["beta"]
        m = b * p + (1 - b) * q
        return b * _kl(p, m) + (1 - b) * _kl(q, m)
    if name == "skew_kl":
        a = kw["alpha"]
        return _kl(p, a * p + (1 - a) * q)
    if name == "skew_reverse_kl":
        a = kw["alpha"]
        return _kl(q, (1 - a) * p + a * q)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise KeyError(name)


def buckets(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(k+1)-way float64 distribution: probs at ids, then the mass outside them."""
    top = probs.gather(-1, ids)
    rest = probs.scatter(-1, ids, 0.0).sum(-1, keepdim=True)
    return torch.cat([top, rest], -1)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 4, 10])
@pytest.mark.parametrize("exact_tail", [True, False])
def test_topk_equals_bucket_reference(name, k, exact_tail):
    sparse, _, kw = CASES[name]
    torch.manual_seed(2)
    temperature = 1.5
    s, t = torch.randn(2, 5, 11) * 2, torch.randn(2, 5, 11) * 2
    mask = _mask((2, 5), seed=3)
    teacher = top_k(t, k, temperature, exact_tail=exact_tail)

    s64 = s.double().requires_grad_(True)
    p = buckets(torch.softmax(t.double() / temperature, -1), teacher.ids)
    q = buckets(torch.softmax(s64 / temperature, -1), teacher.ids)
    ref = reference_rows(name, p, q, **kw)
    want_none = torch.where(mask, ref, torch.zeros_like(ref))
    want_mean = want_none.sum() / mask.sum()
    (want_grad,) = torch.autograd.grad(want_mean, s64)

    got_none = sparse(s, teacher, temperature=temperature, mask=mask, reduction="none", **kw)
    _close(got_none, want_none.detach())
    got_mean, got_grad = _value_and_grad(sparse, s, teacher, temperature=temperature, mask=mask, **kw)
    _close(got_mean, want_mean.detach())
    _close(got_grad, want_grad)


def test_tvd_on_buckets_is_a_lower_bound_of_dense_tvd():
    torch.manual_seed(4)
    s, t = torch.randn(20, 30), torch.randn(20, 30)
    sparse_values = sparse_tvd(s, top_k(t, 5), reduction="none")
    assert bool((sparse_values <= tvd(s, t, reduction="none") + 1e-6).all())


def test_scale_t2_and_reductions():
    torch.manual_seed(5)
    s, t = torch.randn(4, 7, 12), torch.randn(4, 7, 12)
    teacher = top_k(t, 3, 2.0)
    none = sparse_forward_kl(s, teacher, temperature=2.0, reduction="none")
    assert none.shape == (4, 7) and none.dtype == torch.float32
    _close(sparse_forward_kl(s, teacher, temperature=2.0, reduction="sum"), none.sum())
    _close(sparse_forward_kl(s, teacher, temperature=2.0), none.mean())
    _close(sparse_forward_kl(s, teacher, temperature=2.0, scale_t2=True), 4 * none.mean())


def test_generalized_jsd_endpoints():
    torch.manual_seed(6)
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    teacher = top_k(t, 4)
    assert torch.equal(sparse_generalized_jsd(s, teacher, beta=0.0), sparse_forward_kl(s, teacher))
    assert torch.equal(sparse_generalized_jsd(s, teacher, beta=1.0), sparse_reverse_kl(s, teacher))


# --- chunking ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("exact_tail", [True, False])
def test_chunked_equals_unchunked(name, exact_tail):
    sparse, _, kw = CASES[name]
    torch.manual_seed(7)
    s, t = torch.randn(3, 6, 17), torch.randn(3, 6, 17)
    mask = _mask((3, 6), seed=8)
    teacher = top_k(t, 5, 1.3, exact_tail=exact_tail)
    for reduction in ("mean", "none"):
        want = _value_and_grad(sparse, s, teacher, temperature=1.3, mask=mask, reduction=reduction, **kw)
        for chunk_size in (1, 4, 100):
            got = _value_and_grad(
                sparse, s, teacher, temperature=1.3, mask=mask, reduction=reduction, chunk_size=chunk_size, **kw
            )
            _close(got[0], want[0], 1e-6)
            _close(got[1], want[1], 1e-6)


def test_chunked_teacher_logprob_gradients_match_unchunked():
    """The generalised chunking also gives gradients to float teacher tensors that require them."""
    torch.manual_seed(9)
    s, t = torch.randn(7, 12), torch.randn(7, 12)
    base = top_k(t, 4)
    grads = []
    for chunk_size in (None, 3):
        lp = base.logprobs.clone().requires_grad_(True)
        tail = base.tail_logprob.clone().requires_grad_(True)
        sparse_generalized_jsd(s, TopKTeacher(base.ids, lp, tail), chunk_size=chunk_size).backward()
        grads.append((lp.grad, tail.grad))
    _close(grads[0][0], grads[1][0], 1e-6)
    _close(grads[0][1], grads[1][1], 1e-6)


def test_bf16_student_gives_float32_output_and_matches_float32():
    torch.manual_seed(10)
    s, t = torch.randn(4, 3, 16).bfloat16(), torch.randn(4, 3, 16)
    teacher = top_k(t, 6)
    out = sparse_reverse_kl(s, teacher, chunk_size=5)
    assert out.dtype == torch.float32
    _close(out, sparse_reverse_kl(s.float(), teacher))


# --- numerical safety -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_extreme_logits_full_vocab_are_finite(name, chunk_size):
    sparse, dense, kw = CASES[name]
    torch.manual_seed(11)
    s = torch.randn(5, 8) * 1e4  # near-one-hot student: -inf-like log-probs
    t = torch.randn(5, 8) * 30
    teacher = top_k(t, 8)
    value, grad = _value_and_grad(sparse, s, teacher, chunk_size=chunk_size, **kw)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    _close(value, dense(s, t, **kw), 1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_empty_tails_and_minus_inf_give_no_nan(name):
    """Student -inf outside the ids, teacher tail -inf and -inf log-probs inside the top-k: no NaN."""
    sparse, _, kw = CASES[name]
    s = torch.tensor([[3.0, 1.0, -math.inf, -math.inf, -math.inf], [0.5, 2.0, 1.0, -math.inf, -math.inf]])
    ids = torch.tensor([[0, 1, 2], [1, 2, 0]])
    lp = torch.log(torch.tensor([[0.7, 0.3, 0.0], [0.5, 0.3, 0.2]]))
    teacher = TopKTeacher(ids, lp, torch.full((2,), -math.inf))
    for chunk_size in (None, 1):
        value, grad = _value_and_grad(sparse, s, teacher, reduction="none", chunk_size=chunk_size, **kw)
        assert not torch.isnan(value).any() and not torch.isnan(grad).any()
        if name != "reverse_kl" and name != "skew_reverse_kl":
            assert torch.isfinite(value).all()


def test_fallback_tail_is_floored_when_topk_mass_rounds_to_one():
    lp = torch.log(torch.tensor([[0.6, 0.4], [0.5, 0.25]]))
    tail = tail_from_logprobs(lp)
    assert torch.isfinite(tail).all()
    assert tail[0].item() == pytest.approx(math.log(TAIL_MASS_FLOOR))
    assert tail[1].item() == pytest.approx(math.log(0.25), abs=1e-6)
    s = torch.randn(2, 6)
    teacher = TopKTeacher(torch.tensor([[0, 1], [2, 3]]), lp)
    for fn in (sparse_reverse_kl, sparse_skew_reverse_kl, sparse_forward_kl):
        assert torch.isfinite(fn(s, teacher, reduction="none")).all()


def test_masked_rows_with_garbage_do_not_leak():
    torch.manual_seed(12)
    s, t = torch.randn(6, 10), torch.randn(6, 10)
    mask = torch.tensor([True, False, True, True, False, True])
    teacher = top_k(t, 3)
    clean = sparse_forward_kl(s, teacher, mask=mask)
    s_bad = s.clone()
    s_bad[~mask] = math.nan
    lp = teacher.logprobs.clone()
    lp[~mask] = math.nan
    bad = TopKTeacher(teacher.ids, lp, teacher.tail_logprob)
    for chunk_size in (None, 2):
        value, grad = _value_and_grad(sparse_forward_kl, s_bad, bad, mask=mask, chunk_size=chunk_size)
        _close(value, clean)
        assert torch.isfinite(grad).all() and bool((grad[~mask] == 0).all())


# --- TopKTeacher, dispatcher, errors -----------------------------------------------------------------


def test_topk_teacher_shape_to_and_tail():
    teacher = top_k(torch.randn(2, 3, 9), 4)
    assert teacher.shape == (2, 3) and teacher.k == 4
    moved = teacher.to("cpu")
    assert moved.ids.dtype == torch.int64 and moved.shape == teacher.shape
    assert torch.equal(moved.tail(), teacher.tail_logprob)
    derived = TopKTeacher(teacher.ids, teacher.logprobs).tail()
    _close(derived, teacher.tail_logprob)
    with pytest.raises(AttributeError):
        teacher.k = 3  # frozen


def test_topk_teacher_validation():
    ids, lp = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="integer"):
        TopKTeacher(lp, lp)
    with pytest.raises(ValueError, match="float"):
        TopKTeacher(ids, ids)
    with pytest.raises(ValueError, match="same shape"):
        TopKTeacher(ids, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="row shape"):
        TopKTeacher(ids, lp, torch.zeros(3))


def test_sparse_version():
    for name, (sparse, _, _) in CASES.items():
        assert sparse_version(name) is sparse
    assert sparse_version("margin_mse") is None
    assert sparse_version("nope") is None


def test_errors():
    s = torch.randn(2, 3, 8)
    teacher = top_k(torch.randn(2, 3, 8), 2)
    with pytest.raises(TypeError, match="TopKTeacher"):
        sparse_forward_kl(s, torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="row shape"):
        sparse_forward_kl(s[:1], teacher)
    with pytest.raises(ValueError, match="k=2"):
        sparse_forward_kl(s[..., :1], teacher)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 5\)"):
        sparse_forward_kl(s[..., :5], TopKTeacher(teacher.ids + 5, teacher.logprobs))
    with pytest.raises(ValueError, match="temperature"):
        sparse_forward_kl(s, teacher, temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        sparse_forward_kl(s, teacher, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        sparse_forward_kl(s, teacher, chunk_size=0)
    with pytest.raises(ValueError, match="beta"):
        sparse_generalized_jsd(s, teacher, beta=1.5)
    with pytest.raises(ValueError, match="mask"):
        sparse_forward_kl(s, teacher, mask=torch.ones(2, 4, dtype=torch.bool))


def test_student_buckets_value_and_gradient_against_autograd_reference():
    """The one-pass (k+1)-bucket student log-probs equal log_softmax + logsumexp outside the ids, with the
    gradient of that reference (float64, torch.autograd.gradcheck), including a near-empty tail."""
    from potstill.losses.sparse import _StudentBuckets

    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 12, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(12, generator=g)[:3] for _ in range(4)])
    s[3, ids[3]] = 40.0  # the tail holds ~e-40 of the mass
    s.requires_grad_(True)

    def reference(x):
        log_q = torch.log_softmax(x, -1)
        rest = torch.logsumexp(log_q.scatter(-1, ids, -math.inf), -1, keepdim=True)
        return torch.cat([log_q.gather(-1, ids), rest], -1)

    got, want = _StudentBuckets.apply(s, ids), reference(s)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    weights = torch.randn(4, 4, generator=g, dtype=torch.float64)
    (g_got,) = torch.autograd.grad((got * weights).sum(), s)
    (g_want,) = torch.autograd.grad((want * weights).sum(), s)
    torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-10)
    assert torch.autograd.gradcheck(lambda x: _StudentBuckets.apply(x, ids[:3]), (s[:3].detach().requires_grad_(),))
