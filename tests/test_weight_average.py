"""trainer.weight_average: the saved student is the EMA / SWA of the weights after the averaged steps, also
after --resume; the recipe rules around it."""

from __future__ import annotations

import pytest
import torch
from conftest import fit_until_crash
from safetensors.torch import load_file

from potstill.config import validate_recipe
from potstill.config.common import WeightAverageConfig
from potstill.errors import UserError
from potstill.tasks import build_task
from potstill.train import Distiller, build_objectives, run_recipe
from potstill.train import checkpoint as ckpt
from potstill.train.callbacks import Callback
from potstill.train.weight_average import WeightAverage, averaged_tensors


def _average(method: str, **kw) -> WeightAverage:
    return WeightAverage(WeightAverageConfig(method=method, **kw), lambda m: m)


def _set(model: torch.nn.Linear, w: float, b: float) -> None:
    with torch.no_grad():
        model.weight.fill_(w)
        model.bias.fill_(b)


def test_ema_and_swa_by_hand():
    model = torch.nn.Linear(2, 1)
    ema, swa = _average("ema", decay=0.5), _average("swa")
    for w, b in [(4.0, 0.0), (0.0, 2.0), (2.0, -2.0)]:
        _set(model, w, b)
        ema.update(model)
        swa.update(model)
    # EMA: 4 → 0.5·4 + 0.5·0 = 2 → 0.5·2 + 0.5·2 = 2;  bias 0 → 1 → −0.5
    ema.apply(model)
    assert torch.equal(model.weight, torch.full((1, 2), 2.0)) and model.bias.item() == -0.5
    # SWA: the mean of (4, 0, 2) and of (0, 2, −2)
    swa.apply(model)
    assert torch.equal(model.weight, torch.full((1, 2), 2.0)) and model.bias.item() == pytest.approx(0.0, abs=1e-6)
    assert ema.count == swa.count == 3


def test_frozen_weights_and_integer_buffers_are_not_averaged():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    model[0].weight.requires_grad_(False)
    keys = set(averaged_tensors(model))
    assert "0.weight" not in keys and "0.bias" in keys
    assert {"1.running_mean", "1.running_var"} <= keys and "1.num_batches_tracked" not in keys


def test_schedule_of_averaged_steps():
    avg = _average("swa", start=0.5, every=3)
    assert avg.first_step(10) == 6
    assert [s for s in range(1, 11) if avg.takes(s, 10)] == [6, 9, 10]  # the last step always counts
    assert [s for s in range(1, 5) if _average("ema").takes(s, 4)] == [1, 2, 3, 4]


def test_apply_before_any_average_keeps_the_weights():
    model = torch.nn.Linear(2, 1)
    before = model.weight.clone()
    assert _average("ema").apply(model) is False and torch.equal(model.weight, before)


class _Recorder(Callback):
    """The weights after every optimizer step (what the average should be built from)."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, state, result) -> None:
        model = state.student
        self.weights.append({k: v.detach().clone() for k, v in averaged_tensors(model).items()})


def _recipe(digits_recipe, name: str, **trainer) -> dict:
    return dict(digits_recipe, name=name, trainer={**digits_recipe["trainer"], **trainer})


@pytest.mark.parametrize("how", [{"method": "swa", "start": 0.5, "every": 2}, {"method": "ema", "decay": 0.8}])
def test_run_saves_the_average(digits_recipe, capsys, how):
    recipe = validate_recipe(_recipe(digits_recipe, "avg", weight_average=how))
    task = build_task(recipe, run_dir=recipe.run_dir)
    recorder = _Recorder()
    summary = Distiller(task, build_objectives(recipe, task), recipe.trainer, run_dir=recipe.run_dir,
                        eval_config=recipe.eval, callbacks=[recorder]).fit()
    steps = recorder.weights  # 10 steps
    if how["method"] == "swa":  # steps 6, 8, 10
        chosen = [steps[5], steps[7], steps[9]]
        expected = {k: sum(w[k] for w in chosen) / 3 for k in chosen[0]}
    else:
        expected = dict(steps[0])
        for w in steps[1:]:
            expected = {k: 0.8 * expected[k] + 0.2 * w[k] for k in w}
    saved = averaged_tensors(task.student)
    for key, value in expected.items():
        assert not torch.allclose(value, steps[-1][key])  # the average is not the last iterate ...
        torch.testing.assert_close(saved[key], value)  # ... and it is what the run keeps
    assert summary["weight_average"]["averaged"] == (3 if how["method"] == "swa" else 10)
    assert f"the {how['method'].upper()} of its weights over" in capsys.readouterr().err
    stored = load_file(str(recipe.run_dir / "student" / "model.safetensors"))
    assert any(torch.equal(v, saved[k]) for k, v in stored.items() if k in saved)


def test_resume_ends_with_the_average_of_an_uninterrupted_run(digits_recipe):
    how = {"method": "ema", "decay": 0.7, "start": 0.2}
    straight = validate_recipe(_recipe(digits_recipe, "straight", weight_average=how, save_every=4))
    run_recipe(straight)
    halted = validate_recipe(_recipe(digits_recipe, "halted", weight_average=how, save_every=4))
    fit_until_crash(halted, 7)  # checkpoint at step 4 holds the average of steps 3 and 4
    assert [s for s, _ in ckpt.list_checkpoints(halted.run_dir / "checkpoints")] == [4]
    assert (ckpt.step_dir(halted.run_dir / "checkpoints", 4) / WeightAverage.tensors_file).exists()
    run_recipe(halted, resume=True)
    a = load_file(str(straight.run_dir / "student" / "model.safetensors"))
    b = load_file(str(halted.run_dir / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_short_run_still_averages_its_last_step(digits_recipe, capsys):
    recipe = validate_recipe(_recipe(digits_recipe, "late", max_steps=4,
                                     weight_average={"method": "swa", "start": 0.9}))
    assert WeightAverage(recipe.trainer.weight_average, lambda m: m).first_step(4) == 4  # int(0.9 · 4) + 1
    run_recipe(recipe)
    assert "over 1 steps" in capsys.readouterr().err


def test_a_run_stopped_before_averaging_keeps_its_last_weights(digits_recipe, capsys):
    """trainer.max_seconds ends the run after step 1, before step 6 where averaging would begin."""
    how = {"method": "ema", "start": 0.5}
    stopped = validate_recipe(_recipe(digits_recipe, "stopped", max_seconds=1e-6, weight_average=how))
    plain = validate_recipe(_recipe(digits_recipe, "plain", max_steps=1))
    run_recipe(stopped)
    assert "stopped at step 1, before averaging began" in capsys.readouterr().err
    run_recipe(plain)
    a = load_file(str(stopped.run_dir / "student" / "model.safetensors"))
    b = load_file(str(plain.run_dir / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_rules(digits_recipe):
    with pytest.raises(UserError, match=r"trainer.weight_average.decay: .*EMA's rate"):
        validate_recipe(_recipe(digits_recipe, "x", weight_average={"method": "swa", "decay": 0.9}))
    with pytest.raises(UserError, match=r"trainer.weight_average.start"):
        validate_recipe(_recipe(digits_recipe, "x", weight_average={"method": "ema", "start": 1.0}))
    with pytest.raises(UserError, match=r"trainer.weight_average.method"):
        validate_recipe(_recipe(digits_recipe, "x", weight_average={"method": "polyak"}))
    early = _recipe(digits_recipe, "x", weight_average={"method": "ema"},
                    early_stopping={"metric": "accuracy", "mode": "max"})
    early["eval"] = {**digits_recipe["eval"], "every": 1}
    with pytest.raises(UserError, match=r"field trainer.weight_average: .*trainer.early_stopping"):
        validate_recipe(early)


def test_refused_with_fsdp_sharding(digits_recipe, monkeypatch):
    """Under FSDP the main process holds a shard only: the run is refused before any step."""
    from potstill.train import distiller
    from potstill.train.fsdp import FSDPSettings

    monkeypatch.setattr(distiller, "fsdp_settings", lambda *a, **k: FSDPSettings(reshard_after_forward=True))
    monkeypatch.setattr(distiller, "check_fsdp_run", lambda recipe: None)
    recipe = validate_recipe(_recipe(digits_recipe, "sharded", weight_average={"method": "ema"}))
    with pytest.raises(UserError, match="trainer.weight_average: not supported with FSDP"):
        run_recipe(recipe)
    assert not ckpt.list_checkpoints(recipe.run_dir / "checkpoints")
