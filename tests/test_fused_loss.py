"""fused_linear_divergence equals divergence(h @ W.T + b, teacher) in values and gradients, for dense and top-k
teachers; fused_linear_cross_entropy equals cross_entropy(h @ W.T + b, y)."""

from __future__ import annotations

import pytest
import torch

from potstill.losses.divergences import forward_kl, generalized_jsd, reverse_kl, skew_kl, tvd
from potstill.losses.fused import FUSED_DIVERGENCES, fused_linear_cross_entropy, fused_linear_divergence
from potstill.losses.sparse import TopKTeacher, sparse_version

torch.set_num_threads(1)

ROWS, H, V = (3, 7), 16, 50  # 21 rows: chunk sizes 4 and 8 do not divide it

CASES = {
    "forward_kl": (forward_kl, {}),
    "reverse_kl": (reverse_kl, {}),
    "generalized_jsd": (generalized_jsd, {"beta": 0.5}),
    "tvd": (tvd, {}),
}


def _inputs(bias=True, dtype=torch.float32, teacher_vocab=V, vocab=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*ROWS, H, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, H, generator=g) * 0.5).to(dtype).requires_grad_(True)
    b = (torch.randn(vocab, generator=g) * 0.5).to(dtype).requires_grad_(True) if bias else None
    t = torch.randn(*ROWS, teacher_vocab, generator=g).mul(2.0).to(dtype)
    return h, w, b, t


def _grads(out, tensors, scale):
    grads = torch.autograd.grad(out.sum() * scale, tensors)
    return [g.float() for g in grads]


def _reference(name, h, w, b, t, vocab=None, **kw):
    fn, params = CASES[name]
    hf, wf = h.float(), w.float()
    logits = hf @ wf.t() + (b.float() if b is not None else 0.0)
    t = t.float()
    if vocab is not None:
        logits, t = logits[..., :vocab], t[..., :vocab]
    return fn(logits, t, **params, **kw)


def _fused(name, h, w, b, t, **kw):
    return fused_linear_divergence(h, w, t, divergence=name, lm_head_bias=b, **CASES[name][1], **kw)


def _close(got, want, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def _mask():
    mask = torch.rand(*ROWS, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[0, 0] = False
    return mask


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_unfused(name, reduction, masked):
    h, w, b, t = _inputs()
    mask = _mask() if masked else None
    kw = {"temperature": 1.7, "mask": mask, "reduction": reduction}
    want = _reference(name, h, w, b, t, **kw)
    want_grads = _grads(want, (h, w, b), 3.7)
    for chunk_size in (4, 8, 1000):
        got = _fused(name, h, w, b, t, chunk_size=chunk_size, **kw)
        assert got.dtype == torch.float32 and got.shape == want.shape
        _close(got, want)
        for g, wg in zip(_grads(got, (h, w, b), 3.7), want_grads, strict=True):
            _close(g, wg)


@pytest.mark.parametrize("name", list(CASES))
def test_labels_scale_t2_and_weighted_grad_output(name):
    h, w, b, t = _inputs(bias=False)
    labels = torch.randint(0, V, ROWS, generator=torch.Generator().manual_seed(2))
    labels[1, 2:5] = -100
    kw = {"temperature": 2.0, "labels": labels, "scale_t2": True, "reduction": "none"}
    want = _reference(name, h, w, None, t, **kw)
    got = _fused(name, h, w, None, t, chunk_size=5, **kw)
    _close(got, want)
    assert (got[1, 2:5] == 0).all()
    weights = torch.rand(*ROWS, generator=torch.Generator().manual_seed(3))  # per-row grad_output
    want_grads = torch.autograd.grad((want * weights).sum(), (h, w))
    got_grads = torch.autograd.grad((got * weights).sum(), (h, w))
    for g, wg in zip(got_grads, want_grads, strict=True):
        _close(g, wg)
    assert (got_grads[0][1, 2:5] == 0).all()


@pytest.mark.parametrize("name", ["forward_kl", "generalized_jsd"])
def test_bf16_inputs(name):
    h, w, b, t = _inputs(dtype=torch.bfloat16)
    mask = _mask()
    want = _reference(name, h, w, b, t, mask=mask)
    got = _fused(name, h, w, b, t, mask=mask, chunk_size=6)
    assert got.dtype == torch.float32
    _close(got, want, rtol=1e-4, atol=1e-5)  # both sides compute in float32 from the same bf16 values
    grads = torch.autograd.grad(got * 3.7, (h, w, b))
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    for g, wg in zip(grads, _grads(want, (h, w, b), 3.7), strict=True):
        _close(g.float(), wg, rtol=2e-2, atol=1e-3)  # bf16 rounding of the returned grads


@pytest.mark.parametrize("teacher_vocab, student_vocab", [(64, V), (V, 64), (56, 60)])
def test_vocab_size_slices_both_sides(teacher_vocab, student_vocab):
    vocab = 48
    h, w, b, t = _inputs(teacher_vocab=teacher_vocab, vocab=student_vocab)
    want = _reference("forward_kl", h, w, b, t, vocab=vocab)
    got = _fused("forward_kl", h, w, b, t, vocab_size=vocab, chunk_size=8)
    _close(got, want)
    gh, gw, gb = torch.autograd.grad(got, (h, w, b))
    for g, wg in zip((gh, gw, gb), _grads(want, (h, w, b), 1.0), strict=True):
        _close(g, wg)
    assert (gw[vocab:] == 0).all() and (gb[vocab:] == 0).all()


def test_every_named_divergence_and_params():
    h, w, b, t = _inputs()
    logits = h @ w.t() + b
    assert fused_linear_divergence(h, w, t, lm_head_bias=b).item() == pytest.approx(forward_kl(logits, t).item())
    for name in FUSED_DIVERGENCES:
        out = fused_linear_divergence(h, w, t, divergence=name, lm_head_bias=b, chunk_size=4)
        assert torch.isfinite(out)
    got = fused_linear_divergence(h, w, t, divergence="skew_kl", alpha=0.3, lm_head_bias=b, chunk_size=4)
    _close(got, skew_kl(logits, t, alpha=0.3))
    got = fused_linear_divergence(h, w, t, divergence="generalized_jsd", beta=0.9, lm_head_bias=b)
    _close(got, generalized_jsd(logits, t, beta=0.9))


def test_all_masked_and_no_grad_for_frozen_parts():
    h, w, b, t = _inputs()
    mask = torch.zeros(ROWS, dtype=torch.bool)
    out = fused_linear_divergence(h, w, t, lm_head_bias=b, mask=mask)
    assert out.item() == 0.0
    out.backward()
    assert (h.grad == 0).all() and (w.grad == 0).all() and (b.grad == 0).all()
    w_frozen = w.detach()
    out = fused_linear_divergence(h, w_frozen, t, chunk_size=4)
    (gh,) = torch.autograd.grad(out, h)
    (want,) = torch.autograd.grad(forward_kl(h @ w_frozen.t(), t), h)
    _close(gh, want)


def test_bad_input_messages():
    h, w, b, t = _inputs()
    with pytest.raises(ValueError, match="divergence must be one of"):
        fused_linear_divergence(h, w, t, divergence="kl")
    with pytest.raises(ValueError, match="unknown parameter"):
        fused_linear_divergence(h, w, t, divergence="forward_kl", beta=0.5)
    with pytest.raises(ValueError, match="beta"):
        fused_linear_divergence(h, w, t, divergence="generalized_jsd", beta=1.5)
    with pytest.raises(ValueError, match="vocab_size"):
        fused_linear_divergence(h, w, t[..., :40])
    with pytest.raises(ValueError, match="exceeds"):
        fused_linear_divergence(h, w, t, vocab_size=V + 1)
    with pytest.raises(ValueError, match="leading shape"):
        fused_linear_divergence(h, w, t[0])
    with pytest.raises(ValueError, match="H"):
        fused_linear_divergence(h[..., :8], w, t)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_divergence(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_divergence(h, w, t, reduction="batchmean")


def test_masked_rows_are_never_computed():
    h, w, b, t = _inputs()
    mask = _mask()
    h_bad = h.detach().clone()
    h_bad[~mask] = float("nan")
    h_bad.requires_grad_(True)
    got = fused_linear_divergence(h_bad, w, t, lm_head_bias=b, mask=mask, chunk_size=4)
    _close(got, fused_linear_divergence(h, w, t, lm_head_bias=b, mask=mask))
    gh, gw = torch.autograd.grad(got, (h_bad, w))
    assert (gh[~mask] == 0).all() and torch.isfinite(gw).all()


def _top_k(teacher_logits, k, temperature=1.0):
    """Top-k log-probs at `temperature` with the exact tail, written here independently of the cache."""
    log_p = torch.log_softmax(teacher_logits.double() / temperature, -1)
    lp, ids = log_p.topk(k, -1)
    tail = torch.log1p(-lp.exp().sum(-1).clamp_max(1 - 1e-12))
    return TopKTeacher(ids, lp.float(), tail.float())


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "generalized_jsd", "tvd"])
@pytest.mark.parametrize("k", [5, V])
def test_topk_teacher_matches_sparse_divergence_on_full_logits(name, k):
    h, w, b, t = _inputs()
    mask = _mask()
    teacher = _top_k(t, k, temperature=1.5)
    params = CASES[name][1]
    logits = h @ w.t() + b
    kw = {"temperature": 1.5, "mask": mask, "reduction": "sum"}
    want = sparse_version(name)(logits, teacher, **params, **kw)
    got = fused_linear_divergence(h, w, teacher, divergence=name, lm_head_bias=b, chunk_size=4, **params, **kw)
    _close(got, want)
    for g, wg in zip(_grads(got, (h, w, b), 2.0), _grads(want, (h, w, b), 2.0), strict=True):
        _close(g, wg)


def test_topk_teacher_with_padded_student_vocab():
    vocab = 44
    h, w, b, t = _inputs(vocab=V)
    teacher = _top_k(t[..., :vocab], 6)
    want = sparse_version("forward_kl")((h @ w.t() + b)[..., :vocab], teacher)
    got = fused_linear_divergence(h, w, teacher, lm_head_bias=b, vocab_size=vocab, chunk_size=8)
    _close(got, want)
    (gw,) = torch.autograd.grad(got, w)
    assert (gw[vocab:] == 0).all()
    bad = TopKTeacher(teacher.ids.clamp_min(vocab - 1) + 1, teacher.logprobs, teacher.tail_logprob)
    with pytest.raises(ValueError, match="ids must be in"):
        fused_linear_divergence(h, w, bad, vocab_size=vocab)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_cross_entropy_matches_cross_entropy(reduction):
    h, w, b, _ = _inputs()
    targets = torch.randint(0, V, ROWS, generator=torch.Generator().manual_seed(4))
    targets[0, :3] = -100
    logits = h @ w.t() + b
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                             reduction=reduction)
    got = fused_linear_cross_entropy(h, w, targets, lm_head_bias=b, reduction=reduction, chunk_size=4)
    if reduction == "none":
        got = got.flatten()
    _close(got, want)
    for g, wg in zip(_grads(got, (h, w, b), 1.3), _grads(want, (h, w, b), 1.3), strict=True):
        _close(g, wg)
    with pytest.raises(ValueError, match="token ids"):
        fused_linear_cross_entropy(h, w, targets.clamp_min(0) + V, lm_head_bias=b)


def test_autocast_does_not_lower_the_fused_precision():
    h, w, b, t = _inputs()
    want = _reference("forward_kl", h, w, b, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_linear_divergence(h, w, t, lm_head_bias=b, chunk_size=4)
        grads = torch.autograd.grad(got, (h, w, b))
    _close(got, want)  # a bf16 matmul would be off by ~1e-2 here
    for g, wg in zip(grads, _grads(want, (h, w, b), 1.0), strict=True):
        _close(g, wg)
