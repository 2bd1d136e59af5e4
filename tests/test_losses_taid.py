"""Tests for TAID (loss, schedule, state) against independent float64 references written here."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from test_losses import close, logits_pair, random_mask
from test_losses import reference_reduce as reduce_ref

from potstill.losses import OBJECTIVES, TAID, forward_kl, get_objective, reverse_kl, sinkhorn

REDUCTIONS = ["mean", "sum", "none"]


pytestmark = pytest.mark.usefixtures("one_thread")


def taid_at(t, **kw):
    """A TAID objective whose t is fixed at `t` (t_start = t_end = t)."""
    return TAID(t_start=t, t_end=t, **kw)



# --- TAID: values and gradients ------------------------------------------------------------------------


def taid_ref_rows(s, z, t, temperature=1.0):
    """Float64 KL(p_t ‖ q) per row, p_t = softmax(((1 − t)·sg(s) + t·z) / T), q = softmax(s / T)."""
    s = s.double()
    target = torch.softmax(((1 - t) * s.detach() + t * z.double()) / temperature, -1)
    log_q = torch.log_softmax(s / temperature, -1)
    return (target * (target.log() - log_q)).sum(-1)


def _grads(fn, s, z):
    s = s.detach().clone().requires_grad_(True)
    z = z.detach().clone().requires_grad_(True)
    out = fn(s, z)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    gs, gz = torch.autograd.grad((out * weights).sum(), [s, z])
    return out.detach(), gs, gz


@pytest.mark.parametrize("t", [0.0, 0.4, 0.75, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_taid_matches_float64_reference(t, reduction):
    s, z = logits_pair((3, 4, 13), seed=3)
    mask = random_mask((3, 4), seed=4)
    for temperature in (1.0, 2.5):
        obj = taid_at(t, temperature=temperature)
        got = _grads(lambda a, b, obj=obj: obj(a, b, mask=mask, reduction=reduction), s, z)
        want = _grads(lambda a, b, T=temperature: reduce_ref(taid_ref_rows(a, b, t, T), mask, reduction), s, z)
        assert got[0].dtype == torch.float32 and got[0].shape == want[0].shape
        for g, w in zip(got, want, strict=True):
            close(g, w)


@pytest.mark.parametrize("t", [0.3, 0.8])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_taid_closed_form_student_gradient_matches_float64_reference(t, chunk_size):
    """With a constant teacher the student gradient is taken in closed form (softmax(s) − p_t)."""
    s, z = logits_pair((3, 4, 13), seed=9)
    mask = random_mask((3, 4), seed=10)
    weights = torch.linspace(0.5, 1.5, 12).reshape(3, 4)
    for temperature in (1.0, 2.5):
        s1 = s.clone().requires_grad_(True)
        got = taid_at(t, temperature=temperature, chunk_size=chunk_size)(s1, z, mask=mask, reduction="none")
        (g_got,) = torch.autograd.grad((got * weights).sum(), s1)
        s64 = s.double().requires_grad_(True)
        want = reduce_ref(taid_ref_rows(s64, z, t, temperature), mask, "none")
        (g_want,) = torch.autograd.grad((want * weights).sum(), s64)
        close(got, want)
        close(g_got, g_want)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_taid_at_t1_equals_forward_kl(reduction):
    s, z = logits_pair((4, 5, 17), seed=5)
    mask = random_mask((4, 5), seed=6)
    for temperature in (1.0, 2.0):
        obj = taid_at(1.0, temperature=temperature)
        got = _grads(lambda a, b, obj=obj: obj(a, b, mask=mask, reduction=reduction), s, z)
        want = _grads(
            lambda a, b, T=temperature: forward_kl(a, b, temperature=T, mask=mask, reduction=reduction), s, z
        )
        for g, w in zip(got, want, strict=True):
            close(g, w)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_taid_at_t0_gives_exactly_zero_student_gradient(chunk_size):
    s, z = logits_pair((3, 6, 21), seed=7, scale=4.0)
    s.requires_grad_(True)
    for temperature in (1.0, 1.7):
        obj = taid_at(0.0, temperature=temperature, chunk_size=chunk_size)
        for reduction in REDUCTIONS:
            out = obj(s, z, mask=random_mask((3, 6), seed=8), reduction=reduction)
            assert out.abs().max().item() < 1e-5
            (grad,) = torch.autograd.grad(out.sum(), s)
            assert (grad == 0).all()
    z = z.clone().requires_grad_(True)  # a teacher that wants gradients stays in the graph, with zero gradient
    grads = torch.autograd.grad(taid_at(0.0, chunk_size=chunk_size)(s, z), [s, z])
    assert all((g == 0).all() for g in grads)


def test_taid_nonnegative_and_zero_at_match():
    s, z = logits_pair((6, 19), seed=9, scale=3.0)
    for t in (0.0, 0.2, 0.5, 0.9, 1.0):
        assert (taid_at(t)(s, z, reduction="none") >= -1e-6).all()
        assert taid_at(t, temperature=1.5)(z, z, reduction="none").abs().max().item() < 1e-6


def test_taid_is_batch_independent_and_works_on_class_logits():
    """Rows do not interact: a (B, C) classification batch gives each row the value it gets alone."""
    s, z = logits_pair((5, 3), seed=10)
    obj = taid_at(0.6)
    rows = obj(s, z, reduction="none")
    assert rows.shape == (5,)
    for i in range(5):
        close(obj(s[i], z[i], reduction="none"), rows[i])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_taid_chunked_equals_unchunked(reduction):
    s, z = logits_pair((5, 7, 23), seed=11)
    for mask in (None, random_mask((5, 7), seed=12)):
        want = _grads(lambda a, b, m=mask: taid_at(0.4, temperature=1.5)(a, b, mask=m, reduction=reduction), s, z)
        for chunk_size in (4, 35, 1000):
            obj = taid_at(0.4, temperature=1.5, chunk_size=chunk_size)
            got = _grads(lambda a, b, m=mask, obj=obj: obj(a, b, mask=m, reduction=reduction), s, z)
            for g, w in zip(got, want, strict=True):
                close(g, w)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_taid_masked_rows_do_not_count_and_labels_equal_mask(chunk_size):
    s, z = logits_pair((3, 7, 15), seed=13)
    mask = random_mask((3, 7), seed=14)
    obj = taid_at(0.5, chunk_size=chunk_size)
    clean = obj(s, z, mask=mask)
    s_bad, z_bad = s.clone(), z.clone()
    s_bad[~mask] = 1e4
    z_bad[~mask, 1] = float("-inf")
    s_bad[~mask, 2] = float("nan")
    s_bad.requires_grad_(True)
    for reduction in REDUCTIONS:
        out = obj(s_bad, z_bad, mask=mask, reduction=reduction)
        assert torch.isfinite(out).all()
        (grad,) = torch.autograd.grad(out.sum(), s_bad)
        assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()
        labels = torch.randint(0, 15, (3, 7)).masked_fill(~mask, -100)
        close(obj(s, z, labels=labels, reduction=reduction), obj(s, z, mask=mask, reduction=reduction))
    close(obj(s_bad.detach(), z_bad, mask=mask), clean)
    empty = obj(s_bad, z_bad, mask=torch.zeros(3, 7, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad


def test_taid_shared_minus_inf_classes_are_dropped():
    s, z = logits_pair((4, 12), seed=15)
    s_inf, z_inf = s.clone(), z.clone()
    s_inf[:, -3:] = float("-inf")
    z_inf[:, -3:] = float("-inf")
    s_inf.requires_grad_(True)
    for t in (0.0, 0.4, 1.0):
        out = taid_at(t)(s_inf, z_inf, reduction="none")
        close(out, taid_ref_rows(s[:, :-3], z[:, :-3], t))
        (grad,) = torch.autograd.grad(out.sum(), s_inf)
        assert torch.isfinite(grad).all() and (grad[:, -3:] == 0).all()


def test_taid_bf16_input_gives_float32_output():
    s, z = logits_pair((4, 9), seed=16)
    out = taid_at(0.5)(s.bfloat16(), z.bfloat16())
    assert out.dtype == torch.float32
    close(out, taid_ref_rows(s.bfloat16().float(), z.bfloat16().float(), 0.5).mean(), rtol=1e-4, atol=1e-5)


# --- TAID: schedule ------------------------------------------------------------------------------------


def schedule_ref(losses, total, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99, adaptive=True):
    """Plain-Python t after each call of the update, written from the TAID paper's update rule."""
    t, prev, m, out = t_start, None, 0.0, []
    for step, loss in enumerate(losses, start=1):
        t_lin = t_start + (t_end - t_start) * min(step, total) / total
        if not adaptive:
            t = t_lin
        elif prev is not None:
            m = beta * m + (1 - beta) * (prev - loss) / (prev + 1e-15)
            t = min(t_end, max(t_lin, t + alpha * (1 / (1 + math.exp(-m))) * (1 - t)))
        prev = loss
        out.append(t)
    return out


def drive(obj, losses, total, start=1):
    ts = []
    for step, loss in enumerate(losses, start=start):
        obj.on_optimizer_step(loss, step, total)
        ts.append(obj.current_t)
    return ts


DECREASING = [5.0 * 0.9**n + 0.1 for n in range(40)]


@pytest.mark.parametrize("alpha", [5e-4, 0.2])
def test_taid_schedule_with_decreasing_loss(alpha):
    total = 50
    ts = drive(TAID(alpha=alpha), DECREASING, total)
    assert ts == pytest.approx(schedule_ref(DECREASING, total, alpha=alpha), abs=1e-12)
    linear = [0.4 + 0.6 * n / total for n in range(1, len(ts) + 1)]
    assert all(b >= a for a, b in zip(ts, ts[1:], strict=False))
    assert ts[0] == 0.4  # the first call only records the loss
    assert all(t >= lin - 1e-12 and t <= 1.0 for t, lin in zip(ts[1:], linear[1:], strict=True))
    if alpha == 0.2:
        assert ts[-1] > linear[-1] + 0.05  # the adaptive term really moves t ahead of the linear schedule


def test_taid_schedule_reaches_and_stays_at_t_end():
    ts = drive(TAID(t_start=0.2, t_end=0.9, alpha=0.3), DECREASING, 20)
    assert max(ts) == 0.9 and ts[-1] == 0.9


def test_taid_non_adaptive_is_the_linear_schedule():
    total = 30
    ts = drive(TAID(t_start=0.2, adaptive=False, alpha=0.5), DECREASING[:35], total)
    assert ts == pytest.approx([0.2 + 0.8 * min(n, total) / total for n in range(1, 36)], abs=1e-12)


def test_taid_first_call_only_records():
    obj = TAID(t_start=0.3, alpha=0.5)
    obj.on_optimizer_step(2.5, 1, 10)
    assert obj.current_t == 0.3
    assert obj.prev_loss.item() == 2.5 and obj.momentum.item() == 0.0 and bool(obj.has_prev_loss)
    obj.on_optimizer_step(torch.tensor(2.0), 2, 10)
    assert obj.current_t > 0.3 + 0.6 * 2 / 10
    assert obj.prev_loss.item() == 2.0 and obj.momentum.item() == pytest.approx(0.01 * 0.5 / 2.5)


def test_taid_state_dict_round_trip_continues_identically():
    obj = TAID(alpha=0.02)
    drive(obj, DECREASING[:7], 40)
    buffer = io.BytesIO()
    torch.save(obj.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()))
    assert set(state) == {"t", "prev_loss", "momentum", "has_prev_loss"}
    fresh = TAID(alpha=0.02)
    fresh.load_state_dict(state)
    assert fresh.current_t == obj.current_t
    rest = DECREASING[7:20]
    assert drive(fresh, rest, 40, start=8) == drive(obj, rest, 40, start=8)
    s, z = logits_pair((3, 8), seed=17)
    assert torch.equal(fresh(s, z), obj(s, z))


def test_taid_forward_uses_current_t():
    s, z = logits_pair((4, 10), seed=18)
    obj = TAID(t_start=0.4, adaptive=False)
    close(obj(s, z), taid_ref_rows(s, z, 0.4).mean())
    obj.on_optimizer_step(1.0, 5, 10)
    assert obj.current_t == pytest.approx(0.7)
    close(obj(s, z), taid_ref_rows(s, z, 0.7).mean())


def test_taid_errors():
    for kwargs, match in [
        ({"t_start": -0.1}, "t_start"),
        ({"t_start": 0.5, "t_end": 0.4}, "t_end must be >= t_start"),
        ({"t_end": 1.5}, "t_end"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"beta": 1.2}, "beta"),
        ({"adaptive": "yes"}, "adaptive"),
        ({"temperature": 0.0}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            TAID(**kwargs)
    with pytest.raises(TypeError):
        TAID(0.4)  # keyword-only
    obj = TAID()
    for args, match in [
        ((float("nan"), 1, 10), "loss must be a finite"),
        ((torch.ones(2), 1, 10), "single number"),
        ((1.0, 1, 0), "total_steps must be > 0"),
        ((1.0, -1, 10), "step must be >= 0"),
        ((1.0, 1.5, 10), "step must be an int"),
    ]:
        with pytest.raises(ValueError, match=match):
            obj.on_optimizer_step(*args)
    s, z = logits_pair((2, 5))
    with pytest.raises(ValueError, match="same shape"):
        obj(s, z[:, :4])
    with pytest.raises(ValueError, match="reduction"):
        obj(s, z, reduction="avg")


def test_taid_keeps_both_modes_of_a_bimodal_teacher():
    """methods-a §1 (d): a unimodal student family and a bimodal teacher over 20 classes.

    Reverse KL collapses onto one mode; TAID, like forward KL, keeps the mass split over both modes and reaches
    a forward KL no worse than forward-KL training at equal steps. Deterministic (no sampling).
    """
    classes = torch.arange(20, dtype=torch.float32)
    x = (classes - 9.5) / 9.5
    bumps = torch.exp(-((classes - 3) ** 2) / 2.88) + torch.exp(-((classes - 16) ** 2) / 2.88)
    teacher = (bumps / bumps.sum()).log()[None]

    def student(theta):  # a Gaussian bump over the class axis: centre theta[0], width softplus(theta[1])
        return (-((x - theta[0]) ** 2) / (F.softplus(theta[1]) + 1e-3))[None]

    def train(loss_fn, steps=300):
        theta = torch.tensor([0.15, 0.0], requires_grad=True)  # starts leaning towards the right mode
        opt = torch.optim.Adam([theta], lr=0.05)
        for step in range(1, steps + 1):
            loss = loss_fn(student(theta), teacher)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if isinstance(loss_fn, TAID):
                loss_fn.on_optimizer_step(loss.item(), step, steps)
        q = torch.softmax(student(theta.detach())[0], 0)
        return q[:7].sum().item(), q[13:].sum().item(), forward_kl(student(theta.detach()), teacher).item()

    rkl_left, rkl_right, _ = train(reverse_kl)
    assert rkl_left < 0.01 and rkl_right > 0.95  # the toy is hard: mode-seeking training collapses
    taid = TAID()
    left, right, fkl = train(taid)
    assert taid.current_t == 1.0
    assert left > 0.25 and right > 0.25 and abs(left - right) < 0.05
    _, _, fkl_baseline = train(forward_kl)
    assert fkl <= fkl_baseline + 1e-3


# --- catalogue -----------------------------------------------------------------------------------------


def test_catalogue_entries_for_taid_and_sinkhorn():
    taid = get_objective("taid")
    assert taid.fn is TAID and taid.stateful and taid.kind == "logits"
    assert taid.defaults == {
        "t_start": 0.4, "t_end": 1.0, "alpha": 5e-4, "beta": 0.99, "adaptive": True, "temperature": 1.0,
        "chunk_size": None,
    }
    assert "TAID" in taid.paper and taid.formula and "\n" not in taid.formula
    sink = get_objective("sinkhorn")
    assert sink.fn is sinkhorn and not sink.stateful and sink.kind == "logits"
    assert sink.defaults == {"temperature": 2.0, "epsilon": 0.1, "iterations": 20, "block_size": None,
                             "reduction": "mean"}
    assert "SinKD" in sink.paper
    assert not OBJECTIVES["forward_kl"].stateful
    obj = taid.fn(**taid.defaults)  # a stateful entry is instantiated with its params
    assert obj.current_t == 0.4
