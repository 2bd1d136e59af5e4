"""trainer.early_stopping: stop on an eval metric, save the best evaluation's student, survive --resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import fit_until_crash
from safetensors.torch import load_file

from potstill.config import validate_recipe
from potstill.config.common import EarlyStoppingConfig
from potstill.errors import UserError
from potstill.train import checkpoint as ckpt
from potstill.train import run_recipe
from potstill.train.early_stopping import EarlyStopping


def _feed(cfg: dict, values: list[float]) -> tuple[EarlyStopping, torch.nn.Linear, list[int]]:
    """Evaluations at steps 1, 2, ... with `values`; the model's weight is set to the value before each one.
    Returns the callback, the model and the steps evaluated before it stopped."""
    model = torch.nn.Linear(1, 1, bias=False)
    early = EarlyStopping(EarlyStoppingConfig(**cfg), unwrap=lambda m: m)
    state = SimpleNamespace(is_main=True, total=100, student=model)
    seen = []
    for step, value in enumerate(values, start=1):
        with torch.no_grad():
            model.weight.fill_(value)
        early.on_evaluate(state, step, {"accuracy": value, "other": 0.0})
        seen.append(step)
        if early.stopped:
            break
    return early, model, seen


def test_patience_and_min_delta_by_hand():
    # max, min_delta 0.05: 0.6 improves on 0.5; 0.62 and 0.64 are within 0.05 of 0.6: two misses → stop at step 4
    early, model, seen = _feed({"metric": "accuracy", "mode": "max", "patience": 2, "min_delta": 0.05},
                               [0.5, 0.6, 0.62, 0.64, 0.9])
    assert seen == [1, 2, 3, 4] and early.stopped_at == 4
    assert (early.best_step, early.best) == (2, 0.6)
    assert early.restore_best(model) == {"accuracy": 0.6, "other": 0.0}
    assert model.weight.item() == pytest.approx(0.6)
    # min: lower is better; a miss resets when a later value improves
    early, _, seen = _feed({"metric": "accuracy", "mode": "min", "patience": 2}, [3.0, 3.5, 2.0, 2.0, 2.5, 1.0])
    assert seen == [1, 2, 3, 4, 5] and (early.best_step, early.best) == (3, 2.0)


def test_state_round_trip_keeps_the_best_weights():
    early, _, _ = _feed({"metric": "accuracy", "mode": "max", "patience": 5}, [0.5, 0.7, 0.6])
    again = EarlyStopping(EarlyStoppingConfig(metric="accuracy", mode="max", patience=5), unwrap=lambda m: m)
    again.load_state_dict(json.loads(json.dumps(early.state_dict())))
    again.load_tensors(early.tensors())
    assert (again.best_step, again.bad_evaluations, again.last_step) == (2, 1, 3)
    model = torch.nn.Linear(1, 1, bias=False)
    again.restore_best(model)
    assert model.weight.item() == pytest.approx(0.7)


def _recipe(digits_recipe, name: str, **trainer) -> dict:
    return dict(digits_recipe, name=name, trainer={**digits_recipe["trainer"], **trainer},
                eval={**digits_recipe["eval"], "every": 1})


NEVER_BETTER = {"metric": "accuracy", "mode": "max", "patience": 3, "min_delta": 1.0}


def _weights(recipe) -> dict[str, torch.Tensor]:
    return load_file(str(recipe.run_dir / "student" / "model.safetensors"))


def test_run_stops_and_saves_the_best_step(digits_recipe, capsys):
    """No evaluation can beat the first by 1.0: the run stops after 3 misses (step 4) and saves step 1's student,
    the same weights as a 1-step run."""
    one = validate_recipe(dict(digits_recipe, name="one", trainer={**digits_recipe["trainer"], "max_steps": 1}))
    run_recipe(one)
    capsys.readouterr()
    early = validate_recipe(_recipe(digits_recipe, "early", early_stopping=NEVER_BETTER))
    summary = run_recipe(early)
    err = capsys.readouterr().err
    wa, wb = _weights(one), _weights(early)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    one_summary = json.loads((one.run_dir / "summary.json").read_text())
    accuracy = one_summary["table"][-1]["accuracy"]
    assert summary["best"] == {"metric": "accuracy", "mode": "max", "step": 1, "value": accuracy,
                               "stopped_early_at": 4}
    assert summary["steps"] == 4 and summary["table"][-1]["accuracy"] == accuracy
    assert json.loads((early.run_dir / "summary.json").read_text())["best"]["step"] == 1
    lines = [json.loads(x) for x in (early.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    # one console line per evaluation: steps 1-4 during training, and the final one
    assert [line.split(":")[0] for line in err.splitlines() if line.startswith("eval step")] == [
        "eval step 1/10", "eval step 2/10", "eval step 3/10", "eval step 4/10", "eval step 4/10"]
    assert f"eval step 1/10: accuracy {accuracy:.4g}" in err
    assert "early stopping at step 4" in err


def test_resume_selects_the_same_best_checkpoint(digits_recipe):
    """Killed during step 4 (checkpoint at 2 holds step 1's best weights), resumed: same saved student and best."""
    straight = validate_recipe(_recipe(digits_recipe, "straight", early_stopping=NEVER_BETTER, save_every=2))
    run_recipe(straight)
    halted = validate_recipe(_recipe(digits_recipe, "halted", early_stopping=NEVER_BETTER, save_every=2))
    fit_until_crash(halted, 4)
    found = ckpt.list_checkpoints(halted.run_dir / "checkpoints")
    assert [s for s, _ in found] == [2] and (found[0][1] / "best_student.safetensors").is_file()
    summary = run_recipe(halted, resume=True)
    wa, wb = _weights(straight), _weights(halted)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert summary["best"] == json.loads((straight.run_dir / "summary.json").read_text())["best"]
    assert summary["best"]["step"] == 1 and summary["steps"] == 4


def test_needs_periodic_evaluations_and_eval_data(digits_recipe):
    with pytest.raises(UserError, match=r"field trainer.early_stopping: .*eval.every > 0 \(now 0\) and data.eval"):
        validate_recipe(dict(digits_recipe, trainer={**digits_recipe["trainer"], "early_stopping": NEVER_BETTER}))
    no_eval = _recipe(digits_recipe, "x", early_stopping=NEVER_BETTER)
    no_eval["data"] = {"train": digits_recipe["data"]["train"]}
    with pytest.raises(UserError, match=r"and data.eval \(not given\)"):
        validate_recipe(no_eval)


def test_unknown_metric_names_the_field_and_the_valid_ones(digits_recipe):
    recipe = validate_recipe(_recipe(digits_recipe, "bad", early_stopping={**NEVER_BETTER, "metric": "acuracy"}))
    with pytest.raises(UserError) as err:
        run_recipe(recipe)
    message = str(err.value)
    assert "\n" not in message
    assert message == ("field trainer.early_stopping.metric: the classification task has no metric 'acuracy' "
                       '(did you mean "accuracy"?); valid: accuracy, macro_f1, agreement')
    assert not recipe.run_dir.exists()


def test_declared_metric_names_cover_what_the_metric_functions_give():
    """Task.metric_names (what trainer.early_stopping.metric is checked against) holds every key the tasks'
    metric functions return, so a metric they gain is not refused."""
    from potstill.eval.lm import token_metrics
    from potstill.eval.metrics import classification_metrics, embedding_metrics
    from potstill.eval.retrieval import rerank_metrics, retrieval_metrics
    from potstill.tasks import task_class

    logits, labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    vectors = torch.eye(12)
    given = {
        "classification": classification_metrics(logits, labels=labels, teacher_logits=logits),
        "embedding": embedding_metrics(vectors, vectors),
        "causal_lm": token_metrics({"nll": 1.0, "correct": 1.0, "tokens": 2.0, "kl": 0.5, "agree": 1.0}),
        "ranking": {**rerank_metrics(torch.rand(3, 4), torch.rand(3, 4)),
                    **retrieval_metrics(torch.rand(3, 5), torch.eye(3, 5), torch.rand(3, 5))},
    }
    given["seq2seq"] = token_metrics({"nll": 1.0, "correct": 1.0, "tokens": 2.0})
    for task, metrics in given.items():
        missing = set(metrics) - set(task_class(task).metric_names)
        assert not missing, (task, missing)
    assert "accuracy" in task_class("classification").metric_names
    assert "perplexity" in task_class("causal_lm").metric_names
