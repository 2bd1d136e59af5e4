"""The teacher-hacking monitor: power-law trend of the proxy, golden rising while the proxy falls."""

from __future__ import annotations

import math

import pytest

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
    assert monitor.update(30, 0.7, golden=2.52) == []  # within the 2 % tolerance
    messages = monitor.update(40, 0.6, golden=2.7)
    assert len(messages) == 1 and "rose from 2.5 at step 20 to 2.7" in messages[0]
    # golden rising while the proxy also rises is not teacher hacking
    assert TeacherHackingMonitor(min_points=100).update(10, 1.0, 2.0) == []
    other = TeacherHackingMonitor(min_points=100)
    other.update(10, 1.0, golden=2.0)
    assert other.update(20, 1.2, golden=2.5) == []


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
    for step, kl, perplexity in ((10, 1.0, math.exp(3.0)), (20, 0.8, math.exp(2.5)), (40, 0.6, math.exp(2.7))):
        watch.on_evaluate(state, step, {"kl_to_teacher": kl, "perplexity": perplexity})
    assert len(watch.monitor.warnings) == 1 and watch.monitor.warnings[0]["step"] == 40
    assert "warning" in (tmp_path / "metrics.jsonl").read_text()
