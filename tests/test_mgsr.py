"""MGSR (Liu et al. 2024): DAC-KL, the span correlation loss, SCRG, and their wiring into the training loop."""

from __future__ import annotations

import math

import pytest
import torch

from potstill.data.mgsr_scrg import correct_and_regenerate, position_divergences, word_span_ids
from potstill.losses import DACKL, dac_kl, forward_kl, get_objective, span_correlation
from potstill.losses.mgsr_span import fixed_span_ids
from potstill.train.objective import Objective, objective_parameters

INF = float("inf")


def _logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float() * 2


# --- DAC-KL -----------------------------------------------------------------------------------------------------


def test_dac_kl_with_a_full_band_is_forward_kl():
    s, t = _logits(2, 3, 7, seed=1), _logits(2, 3, 7, seed=2)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    for reduction in ("mean", "sum", "none"):
        got = dac_kl(s, t, lower=-INF, upper=INF, mask=mask, reduction=reduction)
        want = forward_kl(s, t, mask=mask, reduction=reduction)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dac_kl_on_a_sharp_band_is_kl_over_the_kept_tokens():
    # teacher probabilities 0.5, 0.3, 0.15, 0.05: a band (log 0.1, log 0.4) keeps tokens 1 and 2 only
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    q = torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    lo, hi = torch.tensor([math.log(0.1)]), torch.tensor([math.log(0.4)])
    got = dac_kl(q.log(), p.log(), lower=lo, upper=hi, sharpness=1e4)
    # p̃ = (0.3, 0.15) / 0.45 = (2/3, 1/3), q̃ = (1/2, 1/2)
    want = 2 / 3 * math.log((2 / 3) / 0.5) + 1 / 3 * math.log((1 / 3) / 0.5)
    assert float(got) == pytest.approx(want, abs=1e-5)
    # the target token is kept whatever the band: token 0 joins, p̃ = (0.5, 0.3, 0.15)/0.95, q̃ = 1/3 each
    got = dac_kl(q.log(), p.log(), lower=lo, upper=hi, sharpness=1e4, target_ids=torch.tensor([0]))
    kept = [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]
    assert float(got) == pytest.approx(sum(x * math.log(x * 3) for x in kept), abs=1e-5)


def test_dac_kl_gradients_reach_the_clipping_network_and_the_student():
    obj = DACKL(top_n=4, hidden=8, chunk_size=3)
    s = _logits(2, 4, 9, seed=3).requires_grad_(True)
    t = _logits(2, 4, 9, seed=4)
    loss = obj(s, t, target_ids=torch.randint(0, 9, (2, 4)), mask=torch.ones(2, 4, dtype=torch.bool))
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    grads = [p.grad for p in objective_parameters([Objective("dac_kl", obj)])]
    assert len(grads) == 4 and all(g is not None for g in grads)
    assert obj.clipper[2].weight.grad.abs().sum() > 0  # the cut points' layer itself
    assert set(obj.log_values()) == {"band_width", "kept_mass"}


def test_dac_kl_band_stays_non_degenerate_when_the_network_trains_alone():
    """Minimising the loss over φ alone would squeeze the band onto tokens the student already gets right;
    the minimum width and the coverage penalty stop that."""
    torch.manual_seed(0)
    obj = DACKL(top_n=8, hidden=16, min_width=2.0, min_mass=0.8)
    s, t = _logits(32, 50, seed=5), _logits(32, 50, seed=6) * 2
    opt = torch.optim.Adam(obj.parameters(), lr=0.05)
    first = float(obj(s, t).detach())
    for _ in range(40):
        opt.zero_grad()
        obj(s, t).backward()
        opt.step()
    assert float(obj(s, t).detach()) < first  # φ did learn something
    lower, upper = obj.cuts(torch.log_softmax(t, -1))
    assert bool((upper - lower >= 2.0 - 1e-5).all())
    assert obj.log_values()["kept_mass"] >= 0.75
    # more than one token per row stays in the band
    log_p = torch.log_softmax(t, -1)
    inside = ((log_p > lower[:, None]) & (log_p < upper[:, None])).sum(-1)
    assert float(inside.float().mean()) >= 2


def test_dac_kl_state_round_trips_and_bad_settings_are_refused():
    a, b = DACKL(top_n=4, hidden=8), DACKL(top_n=4, hidden=8)
    with torch.no_grad():
        a.clipper[2].weight.add_(0.3)
    b.load_state_dict(a.state_dict())
    s, t = _logits(3, 6, seed=7), _logits(3, 6, seed=8)
    assert float(a(s, t).detach()) == float(b(s, t).detach())
    for bad in ({"top_n": 0}, {"min_mass": 1.5}, {"sharpness": 0.0}, {"chunk_size": 0}):
        with pytest.raises(ValueError):
            DACKL(**bad)


def test_the_loop_hands_dac_kl_the_batch_targets():
    obj = Objective("dac_kl", DACKL(top_n=4, hidden=8))
    s, t = _logits(1, 3, 6, seed=9), _logits(1, 3, 6, seed=10)
    targets = torch.tensor([[2, -100, 5]])
    mask = targets != -100
    with torch.no_grad():
        got = obj(s, t, mask, {"targets": targets})
        assert float(got) == pytest.approx(float(obj.fn(s, t, mask=mask, target_ids=targets, reduction="sum")))
        assert float(got) != pytest.approx(float(obj.fn(s, t, mask=mask, reduction="sum")))


# --- span correlation -------------------------------------------------------------------------------------------


def test_span_correlation_is_zero_when_student_equals_teacher():
    t = _logits(2, 5, 7, seed=11)
    assert float(span_correlation(t.clone(), t, span_length=2)) == pytest.approx(0.0, abs=1e-12)


def test_span_correlation_hand_computed():
    # one span of two tokens, V = 2: teacher rows (0.8, 0.2), (0.2, 0.8); student rows both (0.5, 0.5)
    p = torch.tensor([[[0.8, 0.2], [0.2, 0.8]]])
    q = torch.full((1, 2, 2), 0.5)
    # teacher Gram: diag 0.68, off 0.32; student Gram: all 0.5; squared diffs 0.0324 (×2) and 0.0324 (×2)
    # per row (1/2)·(0.0324 + 0.0324) = 0.0324; sum 0.0648, mean 0.0324
    assert float(span_correlation(q.log(), p.log(), span_length=2, reduction="sum")) == pytest.approx(0.0648)
    assert float(span_correlation(q.log(), p.log(), span_length=2)) == pytest.approx(0.0324)
    # spans of length 1: each row compares only its own squared norm, 0.68 vs 0.5 → 0.0324 per row
    assert float(span_correlation(q.log(), p.log(), span_length=1, reduction="sum")) == pytest.approx(0.0648)
    # a third row that is masked out changes nothing
    p3, q3 = torch.cat([p, p[:, :1]], 1), torch.cat([q, q[:, :1] * 0 + torch.tensor([0.9, 0.1])], 1)
    mask = torch.tensor([[True, True, False]])
    got = span_correlation(q3.log(), p3.log(), span_length=2, mask=mask, reduction="none")
    torch.testing.assert_close(got, torch.tensor([[0.0324, 0.0324, 0.0]]))


def test_span_ids_group_the_counted_positions():
    keep = torch.tensor([[False, True, True, True, False, True]])
    assert fixed_span_ids(keep, 2).tolist() == [[-1, 0, 0, 1, -1, 1]]
    # given span ids: tokens 0-1 one span, token 2 alone; equals the fixed rule of the same grouping
    p, q = _logits(1, 3, 5, seed=12), _logits(1, 3, 5, seed=13)
    a = span_correlation(q, p, span_ids=torch.tensor([[0, 0, 1]]), reduction="none")
    b = span_correlation(q[:, :2], p[:, :2], span_length=2, reduction="none")
    c = span_correlation(q[:, 2:], p[:, 2:], span_length=1, reduction="none")
    torch.testing.assert_close(a, torch.cat([b, c], 1))
    assert word_span_ids(["The", "Ġcat", "Ġsat", ",", "Ġwell", "ing", "."]) == [0, 1, 2, 3, 4, 4, 5]


def test_mgsr_objectives_are_catalogued():
    assert get_objective("dac_kl").stateful and get_objective("dac_kl").kind == "logits"
    assert get_objective("span_correlation").defaults == {"span_length": 8, "temperature": 1.0, "reduction": "mean"}


# --- SCRG -------------------------------------------------------------------------------------------------------

V = 10


def _counting_lm(disagree_at: int | None = None, wrong: int = 0):
    """Logits that put (almost) all mass on (previous token + 1) mod V; with `disagree_at`, the model predicts
    `wrong` at that absolute position instead (a crafted student error)."""

    def logits(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = torch.full((*ids.shape, V), -10.0)
        out.scatter_(-1, ((ids + 1) % V)[..., None], 10.0)
        if disagree_at is not None:
            out[:, disagree_at] = -10.0
            out[:, disagree_at, wrong] = 10.0
        return out

    return logits


def test_scrg_corrects_the_one_disagreeing_position_and_regenerates_only_the_suffix():
    prompt = [1, 2]
    # the student's sample follows its own rule: it wrote 7 after 4 (position 4 predicts completion token 2)
    completion = [3, 4, 7, 8, 9, 0]
    calls = []

    def regenerate(prefixes, budgets):
        calls.append((prefixes, budgets))
        return [[(p[-1] + 1 + i) % V for i in range(b + 3)] for p, b in zip(prefixes, budgets, strict=True)]

    result = correct_and_regenerate([prompt], [completion], teacher_logits=_counting_lm(),
                                    student_logits=_counting_lm(disagree_at=3, wrong=7),
                                    regenerate=regenerate, pad_id=0)
    assert result.positions == [2] and result.tokens == [5]  # the teacher's token after 4
    new = result.completions[0]
    assert new[:2] == completion[:2]  # the prefix is kept as sampled
    assert new[2] == 5
    assert new[3:] == [6, 7, 8]  # the regenerated suffix, cut to the original length
    assert len(new) == len(completion)
    assert calls == [([prompt + [3, 4, 5]], [3])]


def test_scrg_leaves_empty_completions_and_stops_at_eos():
    def no_call(prefixes, budgets):
        raise AssertionError("nothing to regenerate")

    # teacher's token at the error is EOS (id 5 here): the row ends there
    result = correct_and_regenerate([[1, 2], [1]], [[3, 4, 7, 8], []], teacher_logits=_counting_lm(),
                                    student_logits=_counting_lm(disagree_at=3, wrong=7),
                                    regenerate=no_call, pad_id=0, eos_id=5)
    assert result.completions == [[3, 4, 5], []]
    assert result.positions == [2, -1]


def test_position_divergences_are_kl_per_position():
    t, s = _logits(2, 3, 4, seed=14), _logits(2, 3, 4, seed=15)
    torch.testing.assert_close(position_divergences(t, s), forward_kl(s, t, reduction="none"))
