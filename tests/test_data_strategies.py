"""Data strategies of issue #6 §5: RAD active selection, pruning + KD, DDK domain weights, TAPIR curriculum."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linprog
from scipy.stats import chisquare

from potstill.data.active import (
    ActiveSelector,
    informativeness,
    robust_inclusion_probabilities,
    systematic_sample,
    worst_case_gain,
)
from potstill.data.curriculum import Curriculum, hard_items, largest_remainder, model_fitting_difficulty
from potstill.data.ddk import DomainWeightedSampler, discrepancy_factor, smoothed_update
from potstill.data.pruning import (
    el2n_scores,
    kd_weight_for_fraction,
    kept_count,
    prune_indices,
    pruned_kd_loss,
)
from potstill.errors import UserError

# ---------------------------------------------------------------------------------------------- RAD


def lp_optimum(g: np.ndarray, b: float, k: float) -> float:
    """max_p Σ p g − top_k(p g) s.t. 0 ≤ p ≤ 1, Σ p = b, as a linear program (top_k via its dual)."""
    n = g.size
    # variables: p (n), t, u (n); maximise Σ p g − k t − Σ u with u_i ≥ p_i g_i − t, u ≥ 0
    c = np.concatenate([-g, [k], np.ones(n)])
    a_ub = np.hstack([np.diag(g), -np.ones((n, 1)), -np.eye(n)])
    a_eq = np.concatenate([np.ones(n), [0.0], np.zeros(n)])[None]
    bounds = [(0, 1)] * n + [(None, None)] + [(0, None)] * n
    res = linprog(c, A_ub=a_ub, b_ub=np.zeros(n), A_eq=a_eq, b_eq=[b], bounds=bounds, method="highs")
    assert res.success
    return -res.fun


def test_rad_probabilities_sum_to_budget_lie_in_unit_interval_and_are_optimal():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(2, 30))
        g = rng.random(n) ** (3 if trial % 2 else 1)
        if trial % 4 == 0:
            g = np.round(g, 1)  # ties and zeros
        b = float(rng.integers(1, n + 1)) if trial % 3 else float(rng.random() * n)
        k = float(rng.random() * n * (0.1, 0.5, 1.0)[trial % 3])
        p = robust_inclusion_probabilities(g, b, k)
        assert p.shape == (n,)
        assert p.sum() == pytest.approx(b, abs=1e-9)
        assert p.min() >= 0 and p.max() <= 1 + 1e-12
        assert worst_case_gain(p, g, k) == pytest.approx(lp_optimum(g, b, k), abs=1e-7)


def test_rad_without_errors_is_top_budget_by_gain():
    g = np.array([0.2, 0.9, 0.1, 0.7, 0.5, 0.8])
    p = robust_inclusion_probabilities(g, 3, 0.0)
    assert p.tolist() == [0, 1, 0, 1, 0, 1]
    tied = robust_inclusion_probabilities(np.array([0.5, 0.5, 0.5, 0.1]), 2, 0.0)
    assert tied.tolist() == [1, 1, 0, 0]  # ties go to the lower index


def test_rad_uncapped_solution_is_inverse_gain_on_best_support():
    # Gains spread enough that no p reaches 1: p ∝ 1/g on the top m, m maximising b(m − k)/Σ 1/g.
    g = np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.05, 0.04])
    b, k = 2.0, 1.5
    p = robust_inclusion_probabilities(g, b, k)
    values = [b * (m - k) / np.sum(1 / g[:m]) for m in range(1, g.size + 1)]
    m = int(np.argmax(values)) + 1
    expected = np.zeros_like(g)
    expected[:m] = (b / np.sum(1 / g[:m])) / g[:m]
    assert expected.max() < 1
    np.testing.assert_allclose(p, expected, atol=1e-9)
    assert worst_case_gain(p, g, k) == pytest.approx(max(values))
    # the adversary costs the learner: more errors, lower value; the value with k = 0 is the top-b sum
    assert worst_case_gain(robust_inclusion_probabilities(g, b, 0.0), g, 0.0) == pytest.approx(1.9)


def test_rad_edge_cases():
    assert robust_inclusion_probabilities(np.zeros(4), 2, 0.5).tolist() == [0.5] * 4
    p = robust_inclusion_probabilities(np.array([0.3, 0.0, 0.2, 0.0]), 3, 0.5)
    assert p[[0, 2]].tolist() == [1, 1] and p.sum() == pytest.approx(3)
    assert robust_inclusion_probabilities(np.array([0.3, 0.2]), 0, 0.0).tolist() == [0, 0]
    with pytest.raises(UserError, match="budget"):
        robust_inclusion_probabilities(np.array([0.3, 0.2]), 3, 0.0)
    with pytest.raises(UserError, match="gains"):
        robust_inclusion_probabilities(np.array([0.3, -0.2]), 1, 0.0)


def test_informativeness_margin_and_entropy():
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(informativeness(probs, "margin"), [0.5, 1.0, 0.0])
    expected = [-(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)), math.log(2), 0.0]
    np.testing.assert_allclose(informativeness(torch.tensor(probs), "entropy"), expected, rtol=1e-6)
    with pytest.raises(UserError, match="kind"):
        informativeness(probs, "variance")


def test_systematic_sampling_hits_inclusion_probabilities():
    p = np.array([0.9, 0.6, 0.3, 0.2, 0.0, 1.0])  # sums to 3
    counts = np.zeros(p.size)
    draws = 4000
    rng = np.random.default_rng(1)
    for _ in range(draws):
        picked = systematic_sample(p, rng)
        assert picked.size == 3 and np.unique(picked).size == 3
        counts[picked] += 1
    np.testing.assert_allclose(counts / draws, p, atol=0.03)


def pool_probs(n: int = 60, seed: int = 0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(n, 4)) * 2
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_selector_respects_budget_across_calls_and_never_repeats():
    probs = pool_probs()
    sel = ActiveSelector(25, teacher_error_rate=0.2, seed=3)
    first = sel.select(probs, count=10)
    second = sel.select(probs, exclude=[0, 1, 2], count=10)
    third = sel.select(probs, count=10)  # only 5 left
    assert [first.size, second.size, third.size] == [10, 10, 5]
    everything = np.concatenate([first, second, third])
    assert np.unique(everything).size == 25 and sel.spent == 25 and sel.remaining == 0
    assert not set(second.tolist()) & {0, 1, 2}
    assert sel.select(probs).size == 0  # budget spent
    # teacher_error_rate = 0 is plain top-b margin sampling
    top = ActiveSelector(8, teacher_error_rate=0.0).select(probs)
    assert top.tolist() == sorted(np.argsort(-informativeness(probs), kind="stable")[:8].tolist())


def test_selector_state_round_trip_continues_identically():
    probs = pool_probs(seed=4)
    a = ActiveSelector(30, seed=7)
    a.select(probs, count=12)
    state = json.loads(json.dumps(a.state_dict()))
    b = ActiveSelector(30, seed=7)
    b.load_state_dict(state)
    assert b.spent == 12
    np.testing.assert_array_equal(a.select(probs, count=9), b.select(probs, count=9))
    with pytest.raises(UserError, match="seed"):
        ActiveSelector(30, seed=8).load_state_dict(state)
    with pytest.raises(UserError, match="rows"):
        a.select(probs[:5])


# ---------------------------------------------------------------------------------------------- pruning


def test_prune_keeps_exact_fraction_and_right_end_by_score():
    for n, f in [(1797, 0.1), (100, 0.3), (7, 0.5), (10, 1.0), (5, 0.01)]:
        kept = prune_indices(n, f, seed=2)
        assert kept.size == kept_count(n, f) == max(1, int(math.floor(f * n + 0.5)))
        assert np.all(np.diff(kept) > 0) and kept.min() >= 0 and kept.max() < n
    np.testing.assert_array_equal(prune_indices(50, 0.2, seed=1), prune_indices(50, 0.2, seed=1))
    assert not np.array_equal(prune_indices(50, 0.2, seed=1), prune_indices(50, 0.2, seed=2))
    scores = np.array([0.5, 3.0, 1.0, 2.0, 0.1, 2.0, 9.0, 0.0, 4.0, 1.5])
    assert prune_indices(10, 0.3, scores=scores, keep="hardest").tolist() == [1, 6, 8]
    assert prune_indices(10, 0.3, scores=scores, keep="easiest").tolist() == [0, 4, 7]
    with pytest.raises(UserError, match="scores"):
        prune_indices(10, 0.3, keep="hardest")
    with pytest.raises(UserError, match="fraction"):
        prune_indices(10, 0.0)


def test_el2n_scores():
    probs = np.array([[0.8, 0.2], [0.5, 0.5]])
    np.testing.assert_allclose(el2n_scores(probs, [0, 1]), [math.hypot(0.2, 0.2), math.hypot(0.5, 0.5)])


def test_kd_weight_decreases_with_kept_fraction():
    fractions = [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
    alphas = [kd_weight_for_fraction(f) for f in fractions]
    assert all(a >= b for a, b in zip(alphas, alphas[1:], strict=False))
    assert alphas[0] > alphas[-1]
    assert kd_weight_for_fraction(1.0) == pytest.approx(0.5)
    assert kd_weight_for_fraction(0.1) == pytest.approx(0.9)
    assert kd_weight_for_fraction(0.3) == pytest.approx(0.5 + 0.4 * math.log10(0.3) / math.log10(0.1))
    assert all(0 <= a <= 1 for a in alphas)


@pytest.mark.usefixtures("one_thread")
def test_pruned_kd_loss_is_ce_at_alpha_zero_and_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g, requires_grad=True)
    t = torch.randn(6, 5, generator=g)
    y = torch.tensor([0, 3, 1, -100, 4, 2])
    counted = y != -100
    ce = F.cross_entropy(s, y, ignore_index=-100)
    assert torch.allclose(pruned_kd_loss(s, t, y, 0.1, alpha=0.0), ce)
    tau = 4.0
    kl = F.kl_div(F.log_softmax(s[counted] / tau, -1), F.softmax(t[counted] / tau, -1), reduction="batchmean")
    for fraction in (0.1, 0.3, 1.0):
        a = kd_weight_for_fraction(fraction)
        direct = (1 - a) * ce + a * tau**2 * kl
        got = pruned_kd_loss(s, t, y, fraction, tau)
        assert torch.allclose(got, direct, atol=1e-6), (fraction, got, direct)
    got = pruned_kd_loss(s, t, y, 0.3, 2.0, alpha=0.7)
    kl2 = F.kl_div(F.log_softmax(s[counted] / 2, -1), F.softmax(t[counted] / 2, -1), reduction="batchmean")
    assert torch.allclose(got, 0.3 * ce + 0.7 * 4 * kl2, atol=1e-6)
    got.backward()
    assert s.grad is not None and torch.all(s.grad[3] == 0) and s.grad.abs().sum() > 0
    # sequence-shaped logits: [B, L, C] with [B, L] labels
    s3, t3 = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    y3 = torch.tensor([[1, -100, 2], [0, 4, -100]])
    flat = pruned_kd_loss(s3.reshape(6, 5), t3.reshape(6, 5), y3.reshape(6), 0.5)
    assert torch.allclose(pruned_kd_loss(s3, t3, y3, 0.5), flat)
    with pytest.raises(UserError, match="alpha"):
        pruned_kd_loss(s, t, y, 0.5, alpha=1.5)


# ---------------------------------------------------------------------------------------------- DDK


DOMAINS = ["web"] * 40 + ["code"] * 25 + ["math"] * 15


def ce_losses(student: dict[str, float], teacher: float = 1.0) -> tuple[dict[str, float], dict[str, float]]:
    return student, {d: teacher for d in student}


def test_ddk_weights_sum_to_one_with_floor_and_follow_the_gap():
    sampler = DomainWeightedSampler(DOMAINS, batch_size=8, smoothing=0.5, seed=0)
    assert sampler.domain_names == ["web", "code", "math"]
    np.testing.assert_allclose(sampler.weights, [1 / 3] * 3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        student = {d: float(1 + 3 * rng.random()) for d in sampler.domain_names}
        w = sampler.update(*ce_losses(student))
        assert w.sum() == pytest.approx(1.0) and (w >= sampler.floor - 1e-12).all()
    assert sampler.floor == pytest.approx(0.5 / 3)
    # larger gap -> larger weight, from a uniform start
    s = DomainWeightedSampler(DOMAINS, batch_size=8)
    w = s.update({"web": 1.2, "code": 2.0, "math": 1.5}, {"web": 1.0, "code": 1.0, "math": 1.0})
    assert w[1] > w[2] > w[0]
    # equal gaps -> uniform stays uniform
    s = DomainWeightedSampler(DOMAINS, batch_size=8)
    w = s.update({"web": 3.0, "code": 2.5, "math": 2.0}, {"web": 2.0, "code": 1.5, "math": 1.0})
    np.testing.assert_allclose(w, [1 / 3] * 3)


def test_ddk_update_matches_paper_formula_and_smoothing():
    student = {"web": 2.0, "code": 3.1, "math": 2.4}
    teacher = {"web": 1.6, "code": 1.9, "math": 1.8}
    ratio = np.exp(np.array([2.0 - 1.6, 3.1 - 1.9, 2.4 - 1.8]))  # perplexity ratios exp(CE_S)/exp(CE_T)
    for alpha in (0.0, 0.3, 0.5, 1.0):
        s = DomainWeightedSampler(DOMAINS, batch_size=4, smoothing=alpha)
        prev = s.weights
        psi = prev * np.exp(ratio)
        expected = alpha * psi / psi.sum() + (1 - alpha) / 3
        np.testing.assert_allclose(s.update(student, teacher), expected, rtol=1e-12)
        np.testing.assert_allclose(s.last_ratios, ratio)
        # history: the second update multiplies the previous weights
        psi2 = expected * np.exp(ratio)
        np.testing.assert_allclose(s.update(student, teacher), alpha * psi2 / psi2.sum() + (1 - alpha) / 3)
    uniform = DomainWeightedSampler(DOMAINS, batch_size=4, smoothing=0.0)
    np.testing.assert_allclose(uniform.update(student, teacher), [1 / 3] * 3)
    init = DomainWeightedSampler(DOMAINS, batch_size=4, loss_kind="perplexity")
    ppl_s, ppl_t = {"web": 8.0, "code": 20.0, "math": 9.0}, {"web": 4.0, "code": 5.0, "math": 6.0}
    np.testing.assert_allclose(init.initialize(ppl_s, ppl_t), discrepancy_factor([2.0, 4.0, 1.5]))
    np.testing.assert_allclose(smoothed_update([0.2, 0.8], [1.0, 1.0], 1.0), [0.2, 0.8])
    with pytest.raises(UserError, match="missing"):
        init.update({"web": 1.0, "code": 1.0}, ppl_t)


def test_ddk_batches_follow_weights_and_cycle_each_domain():
    sampler = DomainWeightedSampler(DOMAINS, batch_size=10, smoothing=1.0, seed=5)
    sampler.update({"web": 1.0, "code": 2.0, "math": 1.5}, {"web": 1.0, "code": 1.0, "math": 1.0})
    w = sampler.weights
    batches = sampler.batches(300)
    assert all(len(b) == 10 for b in batches)
    domain_of = np.array([sampler.domain_names.index(d) for d in DOMAINS])
    flat = [i for b in batches for i in b]
    counts = np.bincount(domain_of[flat], minlength=3)
    assert chisquare(counts, w * counts.sum()).pvalue > 1e-3
    # within a domain, every record appears once before any repeats
    for d, members in enumerate(sampler.members):
        seq = [i for i in flat if domain_of[i] == d]
        full = len(seq) // members.size
        for c in range(full):
            assert sorted(seq[c * members.size:(c + 1) * members.size]) == members.tolist()


def test_ddk_state_round_trip_gives_identical_next_batches():
    a = DomainWeightedSampler(DOMAINS, batch_size=6, seed=9)
    a.batches(7)
    a.update({"web": 1.3, "code": 1.1, "math": 2.2}, {"web": 1.0, "code": 1.0, "math": 1.0})
    a.batches(11)
    state = json.loads(json.dumps(a.state_dict()))
    b = DomainWeightedSampler(DOMAINS, batch_size=6, seed=9)
    b.load_state_dict(state)
    np.testing.assert_allclose(b.weights, a.weights)
    assert a.batches(25) == b.batches(25)
    fresh = DomainWeightedSampler(DOMAINS, batch_size=6, seed=9)
    assert fresh.batches(3) == DomainWeightedSampler(DOMAINS, batch_size=6, seed=9).batches(3)
    with pytest.raises(UserError, match="batch_size"):
        DomainWeightedSampler(DOMAINS, batch_size=5, seed=9).load_state_dict(state)


# ---------------------------------------------------------------------------------------------- TAPIR


def pool(n_per: dict[str, int], seed: int = 0) -> tuple[list[str], np.ndarray]:
    cats = [c for c, n in n_per.items() for _ in range(n)]
    mfd = np.random.default_rng(seed).normal(size=len(cats))
    return cats, mfd


def test_mfd_filter_keeps_exactly_items_above_threshold():
    teacher = np.array([8.0, 9.0, 5.0, 7.0, 10.0])
    student = np.array([8.0, 4.0, 6.0, 3.0, 7.5])
    mfd = model_fitting_difficulty(teacher, student)
    np.testing.assert_allclose(mfd, [0, 5, -1, 4, 2.5])
    assert hard_items(mfd, 2.5).tolist() == [1, 3]  # strictly above δ
    assert hard_items(mfd, 0.0).tolist() == [1, 3, 4]
    with pytest.raises(UserError, match="same items"):
        model_fitting_difficulty(teacher, student[:3])


def test_curriculum_hard_share_rises_and_categories_follow_target():
    cats, mfd = pool({"general": 300, "math": 120, "code": 100, "writing": 80})
    target = {"general": 0.25, "math": 0.35, "code": 0.3, "writing": 0.1}
    cur = Curriculum(cats, target_mix=target, threshold=0.5, rounds=3, hard_share_start=0.1,
                     hard_share_end=0.5, round_size=200, seed=1)
    assert [cur.hard_share(r) for r in range(3)] == pytest.approx([0.1, 0.3, 0.5])
    assert cur.quotas() == {"general": 50, "math": 70, "code": 60, "writing": 20}
    cat_arr = np.array(cats)
    shares = []
    for r in range(3):
        plan = cur.plan(r, mfd)
        assert plan.size == 200 and np.unique(plan).size == 200
        hist = Counter(cat_arr[plan].tolist())
        observed = [hist[c] for c in target]
        assert chisquare(observed, [200 * target[c] for c in target]).pvalue > 0.99
        shares.append(float(np.mean(mfd[plan] > 0.5)))
    assert shares == pytest.approx([0.1, 0.3, 0.5])
    assert cur.next_round == 3


def test_curriculum_caps_hard_share_by_what_exists_and_defaults_to_data_mix():
    cats, _ = pool({"a": 60, "b": 40})
    mfd = np.zeros(100)
    mfd[[0, 1, 2, 70, 71]] = 5.0  # only 5 hard items
    cur = Curriculum(cats, threshold=1.0, rounds=2, hard_share_start=0.0, hard_share_end=0.8, round_size=50)
    assert cur.target_mix == pytest.approx({"a": 0.6, "b": 0.4})
    first, last = cur.plan(0, mfd), cur.plan(1, mfd)
    assert int(np.sum(mfd[first] > 1)) == 0
    assert sorted(np.flatnonzero(mfd > 1).tolist()) == sorted(set(last.tolist()) & {0, 1, 2, 70, 71})
    assert Counter(np.array(cats)[last].tolist()) == {"a": 30, "b": 20}


def test_curriculum_is_deterministic_and_resumes():
    cats, mfd = pool({"x": 50, "y": 50}, seed=3)
    kw = dict(threshold=0.0, rounds=3, hard_share_start=0.2, hard_share_end=0.6, round_size=40, seed=4)
    a, b = Curriculum(cats, **kw), Curriculum(cats, **kw)
    np.testing.assert_array_equal(a.plan(1, mfd), b.plan(1, mfd))
    assert not np.array_equal(a.plan(0, mfd), a.plan(1, mfd))
    state = json.loads(json.dumps(a.state_dict()))
    c = Curriculum(cats, **kw)
    c.load_state_dict(state)
    assert c.planned_rounds == [1, 0] and c.next_round == 2
    np.testing.assert_array_equal(c.plan(2, mfd), a.plan(2, mfd))
    with pytest.raises(UserError, match="round_size"):
        Curriculum(cats, **{**kw, "round_size": 41}).load_state_dict(state)
    with pytest.raises(UserError, match="needs"):
        Curriculum(cats, target_mix={"x": 0.9, "y": 0.1}, **{**kw, "round_size": 90})
    with pytest.raises(UserError, match="no items"):
        Curriculum(cats, target_mix={"z": 1.0}, **kw)


def test_largest_remainder_sums_to_total():
    assert largest_remainder(10, [1, 1, 1]).tolist() == [4, 3, 3]
    assert largest_remainder(7, [0.5, 0.25, 0.25]).sum() == 7
