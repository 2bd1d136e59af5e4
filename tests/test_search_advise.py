"""`potstill advise` (the capacity-gap law and search logs) and the AutoDistiller-style recommender."""

from __future__ import annotations

import json

import numpy as np
import pytest

from potstill.errors import UserError
from potstill.search.advise import law_lines, parse_count
from potstill.search.recommender import Recommender, Ridge, loo_errors


def test_loo_error_of_a_line_fit_matches_the_hand_computed_value():
    # y on x = 0..3 without each point in turn (ordinary least squares, λ = 0):
    # without x=0: y = 1.5x - 2/3 → -2/3 (error 2/3); without x=1: y = 9/7 x - 1/7 → 8/7 (1/7);
    # without x=2: y = 19/14 x - 1/7 → 18/7 (4/7); without x=3: y = x → 3 (1). Mean |error| = 25/42.
    x, y = np.array([[0.0], [1.0], [2.0], [3.0]]), np.array([0.0, 1.0, 2.0, 4.0])
    errors = loo_errors(x, y, lam=0.0)
    assert errors == pytest.approx([-2 / 3, 1 / 7, 4 / 7, -1.0])
    model = Recommender.fit([{"values": {"depth": float(v)}, "quality": q} for v, q in zip(x[:, 0], y, strict=True)],
                            lam=0.0)
    assert model.loo_mae == pytest.approx(25 / 42)
    assert model.baseline_mae == pytest.approx(5 / 3)  # the mean of the other three: 7/3, 1, 1/3, 3
    with pytest.raises(UserError, match="at least 3 finished trials"):
        loo_errors(x[:2], y[:2])


def test_ridge_shrinks_towards_the_mean():
    x, y = np.array([[0.0], [1.0], [2.0], [3.0]]), np.array([0.0, 1.0, 2.0, 3.0])
    assert Ridge.fit(x, y, lam=0.0).predict(np.array([[4.0]]))[0] == pytest.approx(4.0)
    # standardised x has Σz² = 4, so λ = 4 halves the slope: 1.5 + 0.5·(4 - 1.5)
    assert Ridge.fit(x, y, lam=4.0).predict(np.array([[4.0]]))[0] == pytest.approx(2.75)


def test_the_recommender_ranks_an_untried_configuration_first_on_a_linear_log():
    # quality = 0.1·depth + 0.3·[init pruned] - 0.2·log10(lr); the best combination (pruned, depth 4, lr 1e-4)
    # was never tried
    tried = [("layers_from_teacher", 2, 1e-3), ("layers_from_teacher", 4, 1e-3), ("layers_from_teacher", 2, 1e-4),
             ("pruned", 2, 1e-3), ("pruned", 4, 1e-3), ("pruned", 2, 1e-4)]
    records = [{"values": {"init": i, "depth": d, "lr": lr},
                "quality": 0.1 * d + 0.3 * (i == "pruned") - 0.2 * np.log10(lr)} for i, d, lr in tried]
    model = Recommender.fit(records, lam=0.0)
    assert model.loo_mae == pytest.approx(0.0, abs=1e-9)
    ranked = model.rank(model.combinations())
    assert ranked[0].config == {"init": "pruned", "depth": 4, "lr": 1e-4} and not ranked[0].tried
    assert ranked[0].predicted == pytest.approx(0.4 + 0.3 + 0.8)


def test_parse_count():
    assert parse_count("15.6M") == 15_600_000 and parse_count("1.2B") == 1_200_000_000
    assert parse_count("300k") == 300_000 and parse_count("22700000") == 22_700_000
    with pytest.raises(UserError, match="--student-params"):
        parse_count("big")


def test_law_lines_place_the_teacher_against_two_and_a_half_times_the_student():
    wide = law_lines(100_000_000, 10_000_000)
    assert "10.0× the student" in wide[0] and "~25M" in wide[0] and "the gap is wide" in wide[1]
    assert "~40M" in wide[1]  # the student this teacher suits: 100M / 2.5
    assert "within the law's range" in law_lines(25_000_000, 10_000_000)[1]
    assert "close to the teacher's size" in law_lines(12_000_000, 10_000_000)[1]


def _log(teacher: str, trials: list[tuple[str, int, float, int]]) -> dict:
    return {"teacher": teacher, "proxy": "train", "metric": "cosine_to_teacher", "direction": "maximize",
            "trials": [{"number": k, "state": "complete", "label": f"{init} depth {depth}",
                        "values": {"init": init, "depth": depth}, "params": params, "quality": q}
                       for k, (init, depth, q, params) in enumerate(trials)]}


def test_advise_on_a_tiny_teacher_with_and_without_logs(tmp_path):
    from conftest import tiny_bert_encoder
    from typer.testing import CliRunner

    from potstill.cli import app

    teacher = tiny_bert_encoder(tmp_path / "teacher", num_hidden_layers=3)
    from transformers import AutoModel

    size = AutoModel.from_pretrained(teacher).num_parameters()
    runner = CliRunner()
    result = runner.invoke(app, ["advise", "--teacher", str(teacher), "--student-params", str(size // 2),
                                 "--logs", str(tmp_path / "none")])
    assert result.exit_code == 0, result.output
    assert "is 2.0× the student" in result.output and "within the law's range" in result.output
    assert "no logged search trial" in result.output and "init pruned" in result.output

    n = size // 2
    log = _log(str(teacher), [("pruned", 2, 0.80, n), ("layers_from_teacher", 2, 0.70, n),
                              ("layers_from_teacher", 3, 0.75, n + n // 10), ("pruned", 1, 0.60, n // 3),
                              ("layers_from_teacher", 1, 0.50, n // 3)])
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "search.json").write_text(json.dumps(log))
    other = _log("builtin:other", [("layers_from_teacher", 2, 0.99, n)])
    (tmp_path / "other.json").write_text(json.dumps(other))
    result = runner.invoke(app, ["advise", "--teacher", str(teacher), "--student-params", str(n),
                                 "--logs", str(tmp_path), "--logs", str(tmp_path / "other.json")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "student init: pruned (pruned depth 2) scored best among 3 logged trials" in text
    assert "best of the others: layers_from_teacher 0.7500" in text
    assert "recommender (ridge on 5 logged trials; leave-one-out error" in text
