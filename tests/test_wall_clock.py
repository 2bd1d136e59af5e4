"""trainer.max_seconds: the loop stops after the first optimizer step that ends past the budget, and a resumed
run spends only what its checkpoint says is left. A fake clock advances 1 s per teacher call (one per step)."""

from __future__ import annotations

import json
import time

import pytest

from potstill.config import validate_recipe
from potstill.tasks import build_task
from potstill.train import Distiller, build_objectives
from potstill.train import callbacks as cb
from potstill.train import checkpoint as ckpt


class _FakeTime:
    """`time` with a perf_counter that only moves when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)


class _Interrupt(Exception):
    pass


def _distiller(recipe, clock: _FakeTime, interrupt_at: int | None = None) -> Distiller:
    task = build_task(recipe, run_dir=recipe.run_dir)
    original, calls = task.teacher_signal, {"n": 0}

    def one_second_per_step(batch):
        calls["n"] += 1
        if calls["n"] == interrupt_at:
            raise _Interrupt
        clock.now += 1.0
        return original(batch)

    task.teacher_signal = one_second_per_step
    return Distiller(task, build_objectives(recipe), recipe.trainer, run_dir=recipe.run_dir, eval_config=recipe.eval)


@pytest.fixture
def clock(monkeypatch) -> _FakeTime:
    fake = _FakeTime()
    monkeypatch.setattr(cb, "time", fake)
    return fake


def _recipe(digits_recipe, name: str, **trainer):
    return validate_recipe(dict(digits_recipe, name=name, trainer={**digits_recipe["trainer"], "max_steps": 12,
                                                                   **trainer}))


def test_max_seconds_stops_after_the_step_that_reaches_it(digits_recipe, clock):
    recipe = _recipe(digits_recipe, "budget", max_seconds=5)
    summary = _distiller(recipe, clock).fit()
    assert summary["steps"] == 5  # steps end at 1, 2, ..., 5 s; the 5th reaches the budget
    assert [s for s, _ in ckpt.list_checkpoints(recipe.run_dir / "checkpoints")] == [5]
    state = json.loads((ckpt.step_dir(recipe.run_dir / "checkpoints", 5) / "wall_clock.json").read_text())
    assert state == {"seconds": 5.0}


def test_no_budget_runs_every_step(digits_recipe, clock):
    recipe = _recipe(digits_recipe, "unbounded")
    assert _distiller(recipe, clock).fit()["steps"] == 12


def test_resume_spends_only_what_is_left(digits_recipe, clock):
    """Killed in step 5 after a checkpoint at step 3 (3 s spent): the resumed run may spend 2 s more, so it stops
    at step 5, not at step 3 + 5 = 8, and ends with the weights of an uninterrupted 5-step run."""
    recipe = _recipe(digits_recipe, "halted", max_seconds=5, save_every=3)
    with pytest.raises(_Interrupt):
        _distiller(recipe, clock, interrupt_at=5).fit()
    clock.now = 100.0  # the restart takes a while: time outside the loop never counts
    summary = _distiller(recipe, clock).fit(resume=True)
    assert summary["steps"] == 5

    straight = _recipe(digits_recipe, "straight", max_seconds=5, save_every=3)
    _distiller(straight, clock).fit()
    a = (ckpt.step_dir(recipe.run_dir / "checkpoints", 5) / "student.safetensors").read_bytes()
    b = (ckpt.step_dir(straight.run_dir / "checkpoints", 5) / "student.safetensors").read_bytes()
    assert a == b
