"""The teacher-hacking monitor: power-law trend of the proxy, golden rising while the proxy falls."""

from __future__ import annotations

import math

import pytest

from potstill.errors import UserError
from potstill.eval.teacher_hacking import TeacherHackingMonitor, fit_power_law


def test_fit_power_law_recovers_exponent():
    steps = [10, 20, 40, 80, 160]
    a, b = fit_power_law(steps, [3.0 * s ** -0.7 for s in steps])
    assert a == pytest.approx(3.0) and b == pytest.approx(0.7)
    with pytest.raises(ValueError):
        fit_power_law([5, 5], [1.0, 2.0])


def test_healthy_power_law_raises_no_warning():
    monitor = TeacherHackingMonitor()
    for step in range(10, 210, 10):
        proxy = 2.0 * step ** -0.5 * (1 + 0.02 * math.sin(step))  # 2 % noise
        golden = 1.0 + proxy
        assert monitor.update(step, proxy, golden, epochs_seen=step / 50) == []
    assert monitor.warnings == []
    assert "proxy_trend" in monitor.history[-1]


def test_proxy_leaving_its_trend_warns_with_step_and_epochs():
    monitor = TeacherHackingMonitor()
    for step in (10, 20, 30, 40, 50):
        assert monitor.update(step, step ** -0.5) == []
    messages = monitor.update(60, 0.5 * 60 ** -0.5, epochs_seen=12.0)
    assert len(messages) == 1
    assert "step 60" in messages[0] and "below its power-law trend" in messages[0] and "12.0 passes" in messages[0]
    assert monitor.warnings == [{"step": 60, "message": messages[0]}]


def test_golden_rising_while_proxy_falls_warns():
    monitor = TeacherHackingMonitor(min_points=100)  # isolate the golden rule
    monitor.update(10, 1.0, golden=3.0)
    monitor.update(20, 0.8, golden=2.5)
    assert monitor.update(30, 0.7, golden=2.504) == []  # 0.004 nats above the best: within golden_rise
    assert monitor.update(40, 0.6, golden=2.7) == []  # 0.2 nats above, but only one evaluation so far
    messages = monitor.update(50, 0.5, golden=2.6, epochs_seen=7.0)
    assert len(messages) == 1
    assert "2.6 is 0.1000 nats above its best 2.5 at step 20" in messages[0]
    assert "proxy fell from 0.8 to 0.5" in messages[0] and "7.0 passes" in messages[0]
    assert monitor.update(60, 0.4, golden=2.65) == []  # one warning per run of rises, not one per evaluation
    # golden rising while the proxy also rises is not teacher hacking
    assert TeacherHackingMonitor(min_points=100).update(10, 1.0, 2.0) == []
    other = TeacherHackingMonitor(min_points=100)
    other.update(10, 1.0, golden=2.0)
    assert other.update(20, 1.2, golden=2.5) == [] and other.update(30, 1.3, golden=2.5) == []


# The claim benchmark's offline run, by hand: the student's NLL on the oracle's text bottoms out at 1.520 nats, of
# which 1.406 is the oracle's entropy, then climbs to 1.533 while the proxy keeps falling.
TURN_STEPS = list(range(100, 1300, 100))
TURN_PROXY = [0.50, 0.30, 0.22, 0.18, 0.16, 0.15, 0.14, 0.135, 0.13, 0.125, 0.12, 0.115]
TURN_GOLDEN = [1.70, 1.58, 1.54, 1.525, 1.520, 1.521, 1.523, 1.524, 1.526, 1.527, 1.530, 1.533]


def golden_warning_steps(monitor: TeacherHackingMonitor, goldens: list[float], proxies: list[float]) -> list[int]:
    for step, proxy, golden in zip(TURN_STEPS, proxies, goldens, strict=True):
        monitor.update(step, proxy, golden)
    return [w["step"] for w in monitor.warnings if "golden metric" in w["message"]]


def test_a_rise_of_0_013_nats_on_an_nll_of_1_52_warns_after_the_turn():
    # best 1.520 at step 500; > 0.005 above it first at step 900 (1.526), again at 1000 (1.527): patience 2
    assert golden_warning_steps(TeacherHackingMonitor(min_points=100), TURN_GOLDEN, TURN_PROXY) == [1000]
    # the same curve as KL to the oracle (NLL − 1.406 entropy) warns at the same step: the floor cancels
    kl = [g - 1.406 for g in TURN_GOLDEN]
    assert golden_warning_steps(TeacherHackingMonitor(min_points=100), kl, TURN_PROXY) == [1000]
    # (the former rule, 2 % above the whole NLL's best, needed 1.5504 and never fired on this curve)


def test_noisy_flat_or_falling_golden_stays_silent():
    jitter = [0.002, -0.001, 0.003, -0.002, 0.0, 0.001, -0.003, 0.002, -0.001, 0.003, 0.0, -0.002]
    flat = [1.52 + j for j in jitter]  # ± 0.003 around a flat 1.52: at most 0.006 above the best, but never twice
    assert golden_warning_steps(TeacherHackingMonitor(min_points=100), flat, TURN_PROXY) == []
    falling = [1.60 - 0.008 * i + j for i, j in enumerate(jitter)]
    assert golden_warning_steps(TeacherHackingMonitor(min_points=100), falling, TURN_PROXY) == []
    spike = [1.52, 1.52, 1.52, 1.54, 1.52, 1.52, 1.52, 1.54, 1.52, 1.52, 1.52, 1.52]  # isolated spikes
    assert golden_warning_steps(TeacherHackingMonitor(min_points=100), spike, TURN_PROXY) == []
    # with a patience of 1, each spike warns, and so does the jitter's one value 0.006 above its best (step 1000)
    impatient = {"min_points": 100, "golden_patience": 1}
    assert golden_warning_steps(TeacherHackingMonitor(**impatient), spike, TURN_PROXY) == [400, 800]
    assert golden_warning_steps(TeacherHackingMonitor(**impatient), flat, TURN_PROXY) == [1000]


def test_golden_tolerance_was_renamed_and_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="golden_tolerance=0.02 .* replaced by golden_rise"):
        TeacherHackingMonitor(golden_tolerance=0.02)
    with pytest.raises(UserError, match="golden_patience must be an integer >= 1"):
        TeacherHackingMonitor(golden_patience=0)
    with pytest.raises(UserError, match="golden_rise must be a number of nats >= 0"):
        TeacherHackingMonitor(golden_rise=-0.01)


def test_a_run_of_rises_carries_over_a_resume():
    monitor = TeacherHackingMonitor(min_points=100)
    for step, proxy, golden in ((10, 1.0, 2.0), (20, 0.9, 2.01)):
        monitor.update(step, proxy, golden)
    restored = TeacherHackingMonitor(min_points=100)
    restored.load_state_dict(monitor.state_dict())
    assert len(restored.update(30, 0.8, 2.02)) == 1


def test_step_zero_and_zero_proxy_are_skipped_and_state_round_trips():
    monitor = TeacherHackingMonitor()
    assert monitor.update(0, 1.0) == [] and monitor.update(5, 0.0) == []
    assert monitor.history == []
    for step in (10, 20, 30, 40, 50):
        monitor.update(step, step ** -0.5, golden=1.0)
    restored = TeacherHackingMonitor()
    restored.load_state_dict(monitor.state_dict())
    assert restored.update(60, 0.5 * 60 ** -0.5) == monitor.update(60, 0.5 * 60 ** -0.5)
    # an evaluation repeated at the same step after a resume replaces the later history
    restored.update(30, 30 ** -0.5)
    assert [h["step"] for h in restored.history] == [10, 20, 30]


def test_watch_reads_the_golden_metric_from_a_language_models_perplexity(tmp_path):
    """The LM tasks report perplexity, not nll: the loop's watch turns it into the golden NLL."""
    from potstill.train.callbacks import FitState, MetricsLog, TeacherHackingWatch, golden_nll

    assert golden_nll({"nll": 1.5, "perplexity": 9.0}) == 1.5
    assert golden_nll({"perplexity": math.e ** 2}) == pytest.approx(2.0)
    assert golden_nll({"accuracy": 0.9}) is None and golden_nll({"perplexity": float("nan")}) is None
    state = FitState(run_dir=tmp_path, is_main=True, start=0, total=40, rows_per_step=8, epoch_rows=80)
    watch = TeacherHackingWatch(MetricsLog(tmp_path, True, log_every=1))
    watch.monitor.min_points = 100  # isolate the golden rule
    for step, kl, perplexity in ((10, 1.0, math.exp(3.0)), (20, 0.8, math.exp(2.5)), (30, 0.7, math.exp(2.7)),
                                 (40, 0.6, math.exp(2.7))):
        watch.on_evaluate(state, step, {"kl_to_teacher": kl, "perplexity": perplexity})
    assert len(watch.monitor.warnings) == 1 and watch.monitor.warnings[0]["step"] == 40
    assert "warning" in (tmp_path / "metrics.jsonl").read_text()
