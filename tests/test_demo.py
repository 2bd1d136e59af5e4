"""`potstill demo`, shrunk to a few steps on a few texts: files written, table shape, target bookkeeping."""

from __future__ import annotations

import json

import pytest

from potstill.demo import COLUMNS, add_speedup, check_targets, run_demo
from potstill.errors import UserError

MODELS = ["teacher", "student (before)", "student (after)"]


def _rows(before: float, after: float, teacher_speed: float, student_speed: float) -> list[dict]:
    return [{"model": "teacher", "probe_accuracy": 0.96, "sentences_per_s": teacher_speed},
            {"model": "student (before)", "probe_accuracy": before, "sentences_per_s": student_speed},
            {"model": "student (after)", "probe_accuracy": after, "sentences_per_s": student_speed}]


def test_targets_pass_and_miss():
    rows = add_speedup(_rows(0.90, 0.92, 10.0, 31.0))
    assert [r["speedup"] for r in rows] == pytest.approx([1.0, 3.1, 3.1])
    gain, speed = check_targets(rows)
    assert gain["met"] is True and gain["measured"] == "+2.0 points"
    assert speed["met"] is True and speed["measured"] == "3.10×"
    gain, speed = check_targets(add_speedup(_rows(0.90, 0.91, 10.0, 25.0)))
    assert gain["met"] is False and speed["met"] is False


def test_targets_not_measured():
    rows = [{"model": "teacher"}, {"model": "student (after)", "probe_accuracy": 0.9}]
    assert [t["met"] for t in check_targets(add_speedup(rows))] == [None, None]


def test_run_demo_small(tmp_path, capsys):
    try:
        from potstill.assets import minilm_path

        minilm_path()
    except UserError as exc:
        pytest.skip(str(exc))
    overrides = [f"output_dir={tmp_path}", "data.train.limit=64", "data.eval.limit=24", "data.max_length=32",
                 "trainer.max_steps=2", "trainer.batch_size=16", "eval.probe_train.limit=40",
                 "eval.probe_test.limit=30", "eval.batch_size=32"]
    result = run_demo(overrides)

    run_dir = tmp_path / "demo"
    for name in ("demo.json", "report.html", "loss_curve.png", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "demo.json").read_text()) == json.loads(json.dumps(result))

    table = result["table"]
    assert [r["model"] for r in table] == MODELS
    for row in table:
        assert set(COLUMNS) <= set(row), set(COLUMNS) - set(row)
    assert table[0]["speedup"] == pytest.approx(1.0)
    assert len(result["targets"]) == 2 and all(t["met"] in (True, False) for t in result["targets"])
    assert result["timings"]["total_seconds"] > 0 and result["timings"]["steps"] == 2

    html = (run_dir / "report.html").read_text()
    for text in ("probe acc", "Lee ρ", "recall@10", "speed-up", "targets", "total wall time", "loss_curve.png"):
        assert text in html, text
    out = capsys.readouterr().out
    assert "probe acc" in out and "target:" in out


def test_demo_and_cli_do_not_import_each_other():
    """cli runs the demo; the demo finds its recipe in potstill.recipes, not in the cli (no import cycle)."""
    import ast
    from pathlib import Path

    import potstill.demo
    from potstill.recipes import packaged_recipe

    tree = ast.parse(Path(potstill.demo.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "potstill.recipes" in imported and "potstill.cli" not in imported
    assert packaged_recipe("demo").name == "demo.yaml"
