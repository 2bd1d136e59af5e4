"""Teacher-hacking monitor (Tiapkin et al. 2025, "On Teacher Hacking in Language Model Distillation").

A teacher is only an approximation of the true distribution. Distilling for many epochs on a fixed offline set
can keep bringing the student closer to the teacher (the *proxy*: teacher–student divergence on held-out
prompts) while it drifts away from the truth (the *golden* metric: here, the student's NLL on held-out
reference completions). The paper finds that healthy distillation makes the proxy fall like a power law of the
step, proxy ≈ a · step^(−b), and that teacher hacking shows up as the proxy leaving that trend.

`TeacherHackingMonitor.update` takes each evaluation's proxy (and golden, when references exist) and returns
warnings when:

- the newest proxy departs from the power law fitted on log–log to the earlier evaluations by more than
  `tolerance` in log space (|log proxy − fitted| > tolerance; fitted on at least `min_points` points);
- the golden metric has stayed more than `golden_rise` nats above its best (lowest) earlier value for
  `golden_patience` evaluations in a row, each time with the proxy below its value at that best evaluation
  (the proxy falling while golden rises is the paper's definition of teacher hacking). One warning per such run.

Why an absolute rise in nats: the paper's golden metric is KL(truth ‖ student); without an oracle the monitor is
given the student's NLL on reference text, which estimates H(truth) + KL(truth ‖ student). The entropy term is
unknown but the same at every evaluation of a fixed reference set, so a rise of the NLL in nats is a rise of the
KL in nats, whereas a rise relative to the whole NLL is diluted by the entropy (a 0.013-nat rise on an NLL of
1.52, of which 1.41 is entropy, is under 1 %). The teacher's own NLL is no floor either: a student can end up
closer to the truth than its teacher. Defaults, tuned on `benchmarks/claim_teacher_hacking.py` (NLL jitter
≈ 0.001–0.002 nats between evaluations): `golden_rise=0.005` nats, `golden_patience=2`.

It also records how many times the training prompts have been seen (offline epochs), since the risk grows with
repeated passes over the same prompts. Its state is a plain dict (`state_dict`), checkpointed with the run.
"""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass, field
from typing import Any

from potstill.errors import UserError, int_at_least


def fit_power_law(steps: list[float], values: list[float]) -> tuple[float, float]:
    """Least-squares fit of log(value) = log(a) − b · log(step); returns (a, b). Needs ≥ 2 distinct steps."""
    xs = [math.log(s) for s in steps]
    ys = [math.log(v) for v in values]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if n < 2 or sxx == 0:
        raise ValueError("a power-law fit needs at least two distinct steps")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return math.exp(my - slope * mx), -slope


@dataclass
class TeacherHackingMonitor:
    """Watch the proxy (teacher–student divergence) and golden (student NLL on references) curves.

    Defaults: `tolerance=0.15` (≈ ±16 % off the fitted power law), `min_points=4` earlier evaluations before
    the trend is trusted, `golden_rise=0.005` (nats per token above golden's best) for `golden_patience=2`
    evaluations in a row. `golden_tolerance` (a rise relative to the whole golden value) was replaced by
    `golden_rise`; passing it raises a `UserError` that says so.
    """

    tolerance: float = 0.15
    min_points: int = 4
    golden_rise: float = 0.005
    golden_patience: int = 2
    history: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    golden_tolerance: InitVar[float | None] = None

    def __post_init__(self, golden_tolerance: float | None) -> None:
        if golden_tolerance is not None:
            raise UserError(
                f"TeacherHackingMonitor: golden_tolerance={golden_tolerance!r} (a rise relative to the whole golden "
                "NLL) was replaced by golden_rise, the rise in nats per token above golden's best (default 0.005), "
                "with golden_patience evaluations in a row (default 2)")
        if not (self.golden_rise >= 0 and math.isfinite(self.golden_rise)):
            raise UserError(f"TeacherHackingMonitor: golden_rise must be a number of nats >= 0, got "
                            f"{self.golden_rise!r}")
        self.golden_patience = int_at_least("TeacherHackingMonitor: golden_patience", self.golden_patience, 1)

    def update(self, step: int, proxy: float, golden: float | None = None,
               epochs_seen: float | None = None) -> list[str]:
        """Record one evaluation; returns the warnings it raised (also kept in `self.warnings`)."""
        if step <= 0 or not (proxy > 0 and math.isfinite(proxy)):
            return []  # the untrained student (step 0) and a zero proxy cannot go on a log–log plot
        entry: dict[str, Any] = {"step": step, "proxy": proxy}
        if golden is not None and math.isfinite(golden):
            entry["golden"] = golden
        if epochs_seen is not None:
            entry["epochs_seen"] = epochs_seen
        earlier = [h for h in self.history if h["step"] < step]
        messages: list[str] = []
        if len(earlier) >= self.min_points:
            a, b = fit_power_law([h["step"] for h in earlier], [h["proxy"] for h in earlier])
            expected = a * step ** (-b)
            residual = math.log(proxy) - math.log(expected)
            entry["proxy_trend"] = expected
            if abs(residual) > self.tolerance:
                way = "above" if residual > 0 else "below"
                messages.append(
                    f"step {step}: proxy (teacher–student divergence) {proxy:.4g} is {abs(residual):.2f} log units "
                    f"{way} its power-law trend {expected:.4g} (fit proxy ≈ {a:.3g}·step^-{b:.3g} on "
                    f"{len(earlier)} earlier evaluations): possible teacher hacking"
                    + (f" after {epochs_seen:.1f} passes over the training prompts" if epochs_seen else ""))
        goldens = [h for h in earlier if "golden" in h]
        if "golden" in entry and goldens:
            best = min(goldens, key=lambda h: h["golden"])
            rise = entry["golden"] - best["golden"]
            if rise > self.golden_rise and proxy < best["proxy"]:
                entry["golden_streak"] = (earlier[-1].get("golden_streak", 0) if earlier else 0) + 1
            if entry.get("golden_streak") == self.golden_patience:
                messages.append(
                    f"step {step}: golden metric (student NLL on references) {entry['golden']:.4g} is {rise:.4f} nats "
                    f"above its best {best['golden']:.4g} at step {best['step']} (more than {self.golden_rise:g} for "
                    f"{self.golden_patience} evaluations in a row) while the proxy fell from {best['proxy']:.4g} to "
                    f"{proxy:.4g}: the student is fitting the teacher, not the data (teacher hacking)"
                    + (f" after {epochs_seen:.1f} passes over the training prompts" if epochs_seen else ""))
        self.history = earlier + [entry]
        self.warnings.extend({"step": step, "message": m} for m in messages)
        return messages

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "warnings": list(self.warnings)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
        self.warnings = list(state.get("warnings", []))
