"""`potstill demo`, shrunk to a few steps on a few texts: files written, table shape, target bookkeeping."""

from __future__ import annotations

import json

import pytest

from potstill.demo import add_speedup, check_targets, run_demo, suite_columns
from potstill.errors import UserError

MODELS = ["teacher", "student (after)", "ST example (recorded)"]
PEER = {"suite_average": 0.58, "classification": 0.79, "clustering": 0.49, "pair_classification": 0.93,
        "reranking": 0.46, "retrieval": 0.27, "sts": 0.56, "cosine_to_teacher": 0.44, "neighbour_recall@10": 0.35}


def _student(**changes: float) -> dict:
    return {**{k: v + 0.01 for k, v in PEER.items()}, "speedup": 2.8, **changes}


def test_speedup_is_relative_to_the_teacher():
    rows = add_speedup([{"model": "teacher", "sentences_per_s": 10.0}, {"model": "student (after)",
                                                                         "sentences_per_s": 31.0}])
    assert [r["speedup"] for r in rows] == pytest.approx([1.0, 3.1])


def test_targets_pass():
    targets = check_targets(_student(), PEER, 250.0)
    assert [t["met"] for t in targets] == [True] * 5
    assert targets[1]["measured"] == "beats all" and targets[3]["measured"] == "2.80×"
    assert targets[2]["measured"] == "0.450 and 0.360"


def test_targets_miss_names_what_lost():
    targets = check_targets(_student(clustering=0.49, retrieval=0.2, suite_average=0.58, speedup=2.6,
                                     **{"neighbour_recall@10": 0.3}), PEER, 301.0)
    assert [t["met"] for t in targets] == [False] * 5
    assert targets[1]["measured"] == "loses clustering, retrieval"


def test_targets_not_measured():
    assert [t["met"] for t in check_targets({"speedup": None}, PEER, None)] == [None] * 5


def test_suite_columns_flatten_a_suite_result():
    result = {"average": 0.6, "per_type": {"classification": 0.8, "sts": 0.5},
              "fidelity": {"cosine_to_teacher": None, "neighbour_recall@10": 0.4}}
    cols = suite_columns(result)
    assert cols["suite_average"] == 0.6 and cols["classification"] == 0.8 and cols["retrieval"] is None
    assert cols["cosine_to_teacher"] is None and cols["neighbour_recall@10"] == 0.4


def test_run_demo_small(tmp_path, capsys):
    try:
        from potstill.assets import minilm_path

        minilm_path()
    except UserError as exc:
        pytest.skip(str(exc))
    overrides = [f"output_dir={tmp_path}", "data.train.limit=64", "data.eval.limit=24", "data.max_length=32",
                 "trainer.max_steps=2", "trainer.batch_size=16", "eval.probe_train.limit=40",
                 "eval.probe_test.limit=30", "eval.batch_size=32"]
    result = run_demo(overrides, suite_tasks=["polarity-classification", "wordsim-sts"])

    run_dir = tmp_path / "demo"
    for name in ("demo.json", "report.html", "loss_curve.png", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "demo.json").read_text()) == json.loads(json.dumps(result))

    table = result["table"]
    assert [r["model"] for r in table] == MODELS
    for row in table[:2]:
        assert {"probe_accuracy", "suite_average", "classification", "sts", "cosine_to_teacher", "speedup",
                "params"} <= set(row), row
        assert row["clustering"] is None  # not among the two tasks run
    assert table[0]["speedup"] == pytest.approx(1.0) and table[0]["cosine_to_teacher"] == pytest.approx(1.0)
    assert result["suite"]["student"]["per_task"].keys() == {"polarity-classification", "wordsim-sts"}
    assert len(result["targets"]) == 5 and result["targets"][1]["met"] is None  # 4 of 6 types not measured
    assert result["timings"]["total_seconds"] > 0 and result["timings"]["steps"] == 2

    html = (run_dir / "report.html").read_text()
    for text in ("BBC probe", "suite avg", "recall@10", "speed-up", "targets", "total wall time", "loss_curve.png"):
        assert text in html, text
    out = capsys.readouterr().out
    assert "suite avg" in out and "target:" in out and "layer-reduction distillation example" in out


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
