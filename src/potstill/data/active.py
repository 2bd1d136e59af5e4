"""Robust Active Distillation: which unlabelled points to send to an expensive, sometimes wrong teacher.

Baykal, Trinh, Iliopoulos, Menghani, Vee (2023), "Robust Active Distillation", ICLR (arXiv 2210.01213).

The game, as used here. Each candidate point i has a gain g_i ≥ 0 (its informativeness for the student, e.g.
1 − margin of the student's prediction). The learner picks inclusion probabilities p_i ∈ [0, 1] with
Σ p_i = b (the query budget); an adversary then spoils the soft labels of k points (the teacher's expected
number of mistakes among the queried points), choosing where they hurt most. The learner's payoff is

    U(p) = Σ_i p_i g_i − max_{s ∈ [0,1]^n, Σ s = k} Σ_i s_i p_i g_i,

the gain that survives the worst placement of the k errors (k may be fractional). The learner maximises U.

Closed form (re-derived here). Write w_i = p_i g_i. The worst-case loss is the sum of the k largest w, and
top_k(w) = min_t [k·t + Σ_i (w_i − t)₊], so U(p) = max_t [Σ_i min(w_i, t) − k·t]. For a fixed level t no
w_i above t helps, so the learner solves a fractional knapsack: w_i ≤ min(t, g_i) at a cost of w_i / g_i
budget, i.e. a value of g_i per unit of budget. Greedily by gain, point i gets

    p_i = min(1, t / g_i)

until the budget runs out (the last point takes the remainder). The value V(t) of that greedy fill is
concave in t (a partial maximum of a jointly concave function), so the best level t* is found by bisection on
its slope. Consequences:
- k = 0: V never decreases, t* = max g, and p is 1 on the `b` highest-gain points (plain top-b "margin"
  sampling).
- k > 0 and no cap binds: p_i = t*/g_i on the m most informative points (p ∝ 1/g: every chosen point
  carries the same w, so no single error costs more than another), with m maximising b·(m − k) / Σ_{i≤m} 1/g_i
  — the form given in the implementation notes (methods-a §9).
- With the cap p ≤ 1 binding, low-gain points of the support take p = 1 while the high-gain ones are damped.

What was confirmed and what was chosen. The stored copies of the paper that could be searched hold only its
abstract (game-theoretic, parameter-free, queries points "both informative and correctly labelled"); the
closed form above is derived here, not checked against the paper's text, and is verified against a linear
program in the tests. Chosen here: margin (default) or entropy gains; k = `teacher_error_rate` × the number
of points queried in the round; exactly b distinct points drawn with the inclusion probabilities p by
systematic sampling over a random order (Madow's method).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from potstill.errors import UserError, int_at_least

INFORMATIVENESS_KINDS = ("margin", "entropy")
_STATE_FORMAT = 1
# Random stream tag for the selector's draws (kept apart from other samplers' streams).
_SELECT_STREAM = 11
_BISECTION_STEPS = 200


def _as_probs(student_probs: Any) -> np.ndarray:
    if hasattr(student_probs, "detach"):
        student_probs = student_probs.detach().cpu().float().numpy()
    p = np.asarray(student_probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise UserError(f"student_probs must be a (n_points, n_classes >= 2) array of probabilities, got shape "
                        f"{p.shape}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise UserError("student_probs must hold finite, non-negative probabilities (apply softmax to logits)")
    return p


def informativeness(student_probs: Any, kind: str = "margin") -> np.ndarray:
    """Gain of querying each point, from the student's class probabilities `(n, C)` (numpy or torch).

    - "margin" (default): 1 − (p₁ − p₂), p₁ ≥ p₂ the two largest probabilities; in [0, 1], 1 on a tie.
    - "entropy": −Σ_c p_c log p_c in nats, 0 · log 0 = 0; in [0, log C].

    Rows are used as given (not renormalised).
    """
    if kind not in INFORMATIVENESS_KINDS:
        raise UserError(f"informativeness kind must be one of {INFORMATIVENESS_KINDS}, got {kind!r}")
    p = _as_probs(student_probs)
    if kind == "margin":
        top2 = -np.partition(-p, 1, axis=1)[:, :2]
        return 1.0 - (top2[:, 0] - top2[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=1)


def _check_game(gains: Any, budget: float, expected_errors: float) -> tuple[np.ndarray, float, float]:
    g = np.asarray(gains, dtype=np.float64)
    if g.ndim != 1 or g.size == 0:
        raise UserError(f"gains must be a non-empty 1-D array (one gain per candidate), got shape {g.shape}")
    if not np.isfinite(g).all() or (g < 0).any():
        raise UserError("gains must be finite and >= 0")
    if isinstance(budget, bool) or not np.isfinite(budget) or not 0 <= budget <= g.size:
        raise UserError(f"budget must be a number in [0, {g.size}] (the number of candidates), got {budget!r}")
    if isinstance(expected_errors, bool) or not np.isfinite(expected_errors) or expected_errors < 0:
        raise UserError(f"expected_errors must be a number >= 0, got {expected_errors!r}")
    return g, float(budget), float(expected_errors)


def worst_case_gain(probabilities: Any, gains: Any, expected_errors: float) -> float:
    """U(p) = Σ p_i g_i − (the k largest p_i g_i, the k-th fractionally): the learner's payoff in the game."""
    w = np.asarray(probabilities, dtype=np.float64) * np.asarray(gains, dtype=np.float64)
    k = float(expected_errors)
    top = np.sort(w)[::-1]
    whole = min(int(np.floor(k)), top.size)
    spoiled = top[:whole].sum() + ((k - whole) * top[whole] if whole < top.size else 0.0)
    return float(w.sum() - spoiled)


class _Fill:
    """The greedy fill at level t over gains sorted high to low (all > 0), budget b < number of points."""

    def __init__(self, g: np.ndarray, budget: float, k: float) -> None:
        self.g, self.b, self.k = g, budget, k
        self.asc = g[::-1]  # ascending copy for searchsorted
        self.inv_cum = np.cumsum(1.0 / g)  # inv_cum[m − 1] = Σ of 1/g over the m highest gains

    def _uncapped(self, t: float) -> int:
        """q = number of points with g > t (the leading q of the sorted gains): they get p = t / g < 1."""
        return int(self.g.size - np.searchsorted(self.asc, t, side="right"))

    def slope(self, t: float) -> float:
        """Right derivative of V(t) = (greedy value at level t) − k·t."""
        q = self._uncapped(t)
        h_q = self.inv_cum[q - 1] if q else 0.0
        if t * h_q >= self.b:  # the budget runs out among the uncapped points
            m = int(np.searchsorted(self.inv_cum, self.b / t, side="right"))
            if m >= self.g.size:
                return m - self.k
            h_m = self.inv_cum[m - 1] if m else 0.0
            return m - self.g[m] * h_m - self.k
        rest = self.b - t * h_q  # spent on capped points, one unit each, in gain order
        j = q + int(np.floor(rest))
        marginal = self.g[j] * h_q if j < self.g.size and rest > np.floor(rest) else 0.0
        return q - marginal - self.k

    def probabilities(self, t: float) -> np.ndarray:
        cost = np.minimum(1.0, t / self.g)
        cum = np.cumsum(cost)
        p = np.where(cum <= self.b, cost, 0.0)
        m = int(np.searchsorted(cum, self.b, side="right"))
        if m < self.g.size:
            p[m] = self.b - (cum[m - 1] if m else 0.0)
        left = self.b - p.sum()
        # Any unspent budget (every point filled at this level) raises p in gain order: it never lowers U.
        for i in range(self.g.size):
            if left <= 0:
                break
            add = min(1.0 - p[i], left)
            p[i] += add
            left -= add
        return np.clip(p, 0.0, 1.0)


def robust_inclusion_probabilities(gains: Any, budget: float, expected_errors: float) -> np.ndarray:
    """The learner's optimal inclusion probabilities p (0 ≤ p ≤ 1, Σ p = budget) in RAD's game.

    `gains` g ≥ 0 per candidate, `budget` b in [0, n], `expected_errors` k ≥ 0 (the number of queried points
    whose teacher label the adversary spoils). See the module docstring for the game and the derivation:
    p_i = min(1, t*/g_i) greedily by gain, t* maximising the value that survives the worst k errors.
    k = 0 gives the top-b points by gain (ties go to the lower index). Points of gain 0 are used only once
    every positive-gain point has p = 1; when the budget covers all positive-gain points, they all get p = 1
    (extra probability never lowers the payoff). If every gain is 0, or k ≥ the number of positive-gain
    points, no choice keeps any gain: p is spread evenly (b / n each).
    """
    g, b, k = _check_game(gains, budget, expected_errors)
    n = g.size
    p = np.zeros(n)
    order = np.argsort(-g, kind="stable")
    positive = order[g[order] > 0]
    if b == 0:
        return p
    if positive.size == 0 or k >= positive.size:
        return np.full(n, b / n)
    if b >= positive.size:
        p[positive] = 1.0
        zeros = order[positive.size:]
        if zeros.size:
            p[zeros] = (b - positive.size) / zeros.size
        return p
    fill = _Fill(g[positive], b, k)
    lo, hi = 0.0, float(fill.g[0])
    scale = 1e-12 * max(1.0, float(positive.size))
    if fill.slope(hi) >= -scale:
        t = hi
    else:
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            if mid <= lo or mid >= hi:
                break
            if fill.slope(mid) >= -scale:
                lo = mid
            else:
                hi = mid
        t = lo if lo > 0 else hi
    p[positive] = fill.probabilities(t)
    return p


def systematic_sample(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exactly round(Σ p) distinct indices, index i included with probability p_i (each p_i ≤ 1).

    Madow's systematic sampling over a random order: lay the p's end to end in a shuffled order and take the
    items under the points u, u + 1, …, u + m − 1 with u uniform in [0, 1). Returned sorted.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    m = int(round(float(p.sum())))
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    perm = rng.permutation(p.size)
    cum = np.cumsum(p[perm])
    cum *= m / cum[-1]
    points = rng.random() + np.arange(m)
    picked = np.unique(perm[np.minimum(np.searchsorted(cum, points, side="right"), p.size - 1)])
    if picked.size < m:  # rounding put two points in one unit: top up with the likeliest unpicked items
        ranked = np.argsort(-p, kind="stable")
        ranked = ranked[~np.isin(ranked, picked)]
        picked = np.union1d(picked, ranked[:m - picked.size])
    return np.sort(picked).astype(np.int64)


class ActiveSelector:
    """Pool-based query selection for active distillation (RAD), with a total query budget.

    `budget`: total number of teacher queries over all calls. `teacher_error_rate` ε in [0, 1) (default 0.1):
    share of the teacher's soft labels expected to be wrong among queried points, so k = ε × (points queried
    in a call); ε = 0 is plain top-b informativeness sampling. `kind`: "margin" (default) or "entropy".

    `select(student_probs, exclude=None, count=None)`: `student_probs` is `(n_pool, C)` for the whole pool,
    row i always being pool point i. Returns the sorted indices of `min(count, remaining budget, candidates)`
    distinct points (count defaults to the remaining budget), drawn with RAD's inclusion probabilities among
    the candidates: the points neither in `exclude` nor returned by an earlier call. The draw of call c is a
    pure function of (seed, c), so `state_dict()` / `load_state_dict()` resume it exactly.
    """

    def __init__(self, budget: int, *, teacher_error_rate: float = 0.1, kind: str = "margin", seed: int = 0) -> None:
        self.budget = int_at_least("budget", budget, 0)
        if isinstance(teacher_error_rate, bool) or not 0 <= float(teacher_error_rate) < 1:
            raise UserError(f"teacher_error_rate must be a number in [0, 1), got {teacher_error_rate!r}")
        if kind not in INFORMATIVENESS_KINDS:
            raise UserError(f"kind must be one of {INFORMATIVENESS_KINDS}, got {kind!r}")
        self.teacher_error_rate = float(teacher_error_rate)
        self.kind = kind
        self.seed = int_at_least("seed", seed, 0)
        self._queried: set[int] = set()
        self._calls = 0

    @property
    def spent(self) -> int:
        """Queries returned so far."""
        return len(self._queried)

    @property
    def remaining(self) -> int:
        return self.budget - self.spent

    @property
    def queried(self) -> np.ndarray:
        """Sorted indices returned by all calls so far."""
        return np.array(sorted(self._queried), dtype=np.int64)

    def select(self, student_probs: Any, exclude: Iterable[int] | None = None, count: int | None = None) -> np.ndarray:
        probs = _as_probs(student_probs)
        n = probs.shape[0]
        if self._queried and max(self._queried) >= n:
            raise UserError(f"student_probs has {n} rows but earlier calls queried pool index "
                            f"{max(self._queried)}; pass the whole pool every call")
        blocked = set(self._queried)
        if exclude is not None:
            ex = np.asarray(list(exclude), dtype=np.int64).reshape(-1)
            if ex.size and (ex.min() < 0 or ex.max() >= n):
                raise UserError(f"exclude holds indices outside the pool [0, {n})")
            blocked.update(ex.tolist())
        want = self.remaining if count is None else int_at_least("count", count, 0)
        free = np.ones(n, dtype=bool)
        free[np.fromiter(blocked, dtype=np.int64, count=len(blocked))] = False
        candidates = np.flatnonzero(free)
        m = min(want, self.remaining, candidates.size)
        call = self._calls
        self._calls += 1
        if m == 0:
            return np.zeros(0, dtype=np.int64)
        gains = informativeness(probs[candidates], self.kind)
        p = robust_inclusion_probabilities(gains, m, self.teacher_error_rate * m)
        rng = np.random.default_rng((_SELECT_STREAM, self.seed, call))
        chosen = candidates[systematic_sample(p, rng)]
        self._queried.update(chosen.tolist())
        return np.sort(chosen)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: settings, number of calls, and the queried indices."""
        return {"format": _STATE_FORMAT, "budget": self.budget, "teacher_error_rate": self.teacher_error_rate,
                "kind": self.kind, "seed": self.seed, "calls": self._calls, "queried": self.queried.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise UserError("active-selector state must be the dict from ActiveSelector.state_dict() "
                            f"(format {_STATE_FORMAT})")
        for key in ("budget", "teacher_error_rate", "kind", "seed"):
            if state.get(key) != getattr(self, key):
                raise UserError(f"active-selector state has {key}={state.get(key)!r}, this selector has "
                                f"{getattr(self, key)!r}; build the selector with the saved settings")
        queried = [int(i) for i in state["queried"]]
        if len(queried) > self.budget:
            raise UserError(f"active-selector state lists {len(queried)} queries, more than the budget {self.budget}")
        self._calls = int_at_least("calls", state["calls"], 0)
        self._queried = set(queried)
