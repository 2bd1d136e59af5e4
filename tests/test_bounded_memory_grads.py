"""The bounded-memory paths take their gradient in forward and scale it in backward, in place.

`chunk_size` (row chunking) and the fused lm_head compute each chunk's gradient during forward; backward only
scales it by the incoming gradient. These tests pin what that design must keep: the same gradient as the
unchunked formula for a non-unit incoming gradient, no graph under `no_grad`, and a loud error (not a gradient
scaled twice) on a second backward through the same graph.
"""

from __future__ import annotations

import pytest
import torch

from potstill.losses import generalized_jsd
from potstill.losses.fused import fused_linear_divergence

pytestmark = pytest.mark.usefixtures("one_thread")


def _jsd_rows_float64(s: torch.Tensor, t: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    p_s, p_t = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)
    m = beta * p_t + (1 - beta) * p_s
    return beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)


def _pair(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g) * 2


def test_chunked_gradient_is_taken_once_and_used_once():
    s, t = _pair((4, 3, 9), seed=30)
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    (2.5 * generalized_jsd(s1, t, reduction="sum")).backward()
    out = generalized_jsd(s2, t, reduction="sum", chunk_size=5)
    (2.5 * out).backward(retain_graph=True)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="inplace"):
        out.backward()
    with torch.no_grad():  # no gradient wanted: values only, no graph
        plain = generalized_jsd(s2, t, reduction="none", chunk_size=5)
    assert plain.grad_fn is None
    torch.testing.assert_close(plain.double(), _jsd_rows_float64(s, t), rtol=1e-5, atol=1e-6)


def test_fused_summed_gradients_are_used_once():
    g = torch.Generator().manual_seed(31)
    h = torch.randn(2, 6, 8, generator=g).requires_grad_(True)
    w = (torch.randn(20, 8, generator=g) * 0.5).requires_grad_(True)
    b = (torch.randn(20, generator=g) * 0.5).requires_grad_(True)
    t = torch.randn(2, 6, 20, generator=g) * 2
    want = torch.autograd.grad(3.0 * generalized_jsd(h @ w.t() + b, t, reduction="mean"), (h, w, b))
    out = fused_linear_divergence(h, w, t, divergence="generalized_jsd", lm_head_bias=b, chunk_size=5)
    got = torch.autograd.grad(3.0 * out, (h, w, b), retain_graph=True)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="inplace"):
        torch.autograd.grad(out, (h, w, b))
