"""Run reports: metrics.jsonl reading, loss-curve PNG, HTML page, rich table."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from rich.console import Console
from rich.table import Table

from potstill.errors import UserError
from potstill.report import format_value, plot_loss_curve, read_metrics, rich_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_metrics(path, records, tail: str = ""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")
    return path


def _records(n=30):
    recs = [{"step": i, "loss": 2.0 / (i + 1), "lr": 1e-4} for i in range(1, n + 1)]
    recs += [{"step": 10, "eval/accuracy": 0.5, "eval/loss": 1.2}, {"step": 20, "eval/accuracy": 0.7}]
    return recs


# ---------------------------------------------------------------------------------------- read_metrics
def test_read_metrics_skips_truncated_last_line(tmp_path):
    path = _write_metrics(tmp_path / "metrics.jsonl", _records(3), tail='{"step": 4, "lo')
    recs = read_metrics(path)
    assert len(recs) == 5
    assert recs[0] == {"step": 1, "loss": 2.0 / 2, "lr": 1e-4}


def test_read_metrics_blank_lines_and_bad_middle_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n\n{"step": 2, "loss": 0.5}\n', encoding="utf-8")
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\n{broken\n{"step": 3}\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 2"):
        read_metrics(path)
    with pytest.raises(UserError, match="not found"):
        read_metrics(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------------ plot
def test_plot_loss_curve_png(tmp_path):
    out = plot_loss_curve(_records(80), tmp_path / "curve.png")
    assert out == tmp_path / "curve.png"
    assert out.read_bytes()[:8] == PNG_MAGIC
    # eval-only records are enough for a plot too
    out2 = plot_loss_curve([{"step": 5, "eval/f1": 0.4}], tmp_path / "eval_only.png")
    assert out2 is not None and out2.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png", "eval_only.png"]


def test_plot_loss_curve_nothing_to_plot(tmp_path):
    assert plot_loss_curve([], tmp_path / "a.png") is None
    assert (
        plot_loss_curve(
            [{"loss": 1.0}, {"step": 3, "lr": 0.1}, {"step": 4, "loss": None}], tmp_path / "b.png"
        )
        is None
    )
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------------- formatting
@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.123456, "0.123"),
        (3, "3"),
        (1234567, "1,234,567"),
        (12345.678, "12,345.7"),
        (np.float32(0.5), "0.500"),
        (np.int64(5000), "5,000"),
        (2e-5, "2.00e-05"),
        (None, "—"),
        (True, "yes"),
        ("abc", "abc"),
        (float("nan"), "nan"),
    ],
)
def test_format_value(value, text):
    assert format_value(value) == text


# -------------------------------------------------------------------------------------------------- html
def test_write_report(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _write_metrics(run / "metrics.jsonl", _records(), tail='{"step": 99, "loss"')
    rows = [
        {"model": "teacher", "accuracy": 0.91234, "params": 109482240},
        {"model": "student <tiny>", "accuracy": 0.8771, "params": 4386048, "items/s": 5321.5},
    ]
    path = write_report(
        run,
        title="Distil <BBC> & co",
        tables=[("Results", rows)],
        notes=["student is 25x smaller", "<script>alert(1)</script>"],
        summary={"recipe": "bbc.yaml", "best step": 20, "final loss": 0.0645},
    )
    assert path == run / "report.html"
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # title and text escaped
    assert "Distil &lt;BBC&gt; &amp; co" in page
    assert "student &lt;tiny&gt;" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page
    # table values formatted, columns = union in first-seen order
    assert "0.912" in page and "0.877" in page
    assert "109,482,240" in page and "5,321.5" in page
    header = page[page.index("<thead>") : page.index("</thead>")]
    positions = [header.index(f">{c}<") for c in ("model", "accuracy", "params", "items/s")]
    assert positions == sorted(positions)
    # summary and notes
    assert "bbc.yaml" in page and "0.065" in page
    assert "<li>student is 25x smaller</li>" in page
    # self-contained: the image is the PNG file itself, base64 in a data: URI; no URL, no other file needed
    png = (run / "loss_curve.png").read_bytes()
    assert png[:8] == PNG_MAGIC
    assert f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page
    assert "http://" not in page and "https://" not in page and "<link" not in page and "@import" not in page
    assert "url(" not in page
    # atomic writes leave no temp files behind
    assert sorted(p.name for p in run.iterdir()) == ["loss_curve.png", "metrics.jsonl", "report.html"]


def test_write_report_without_metrics(tmp_path):
    path = write_report(tmp_path / "new_run", title="No training", tables=[("Empty", [])])
    page = path.read_text(encoding="utf-8")
    assert "No training" in page and "(no rows)" in page
    assert "<img" not in page
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]


def test_write_report_explicit_metrics_path(tmp_path):
    metrics = _write_metrics(tmp_path / "elsewhere.jsonl", _records(5))
    run = tmp_path / "run"
    write_report(run, title="t", metrics_path=metrics)
    assert (run / "loss_curve.png").exists()
    assert '<img src="data:image/png;base64,' in (run / "report.html").read_text(encoding="utf-8")


# -------------------------------------------------------------------------------------------------- rich
def test_rich_table():
    rows = [{"model": "a", "acc": 0.5}, {"model": "b", "params": 12000}]
    table = rich_table("Results", rows)
    assert isinstance(table, Table)
    assert [c.header for c in table.columns] == ["model", "acc", "params"]
    console = Console(width=80, record=True)
    console.print(table)
    text = console.export_text()
    assert "0.500" in text and "12,000" in text and "—" in text


def test_run_report_speedup_and_flatten():
    from potstill.report.run_report import flatten, speedup

    table = [{"model": "teacher", "params": 1000, "samples_per_s": 100.0, "samples_per_s_spread": 0.2},
             {"model": "student (before)", "params": 100},
             {"model": "student (after)", "params": 100, "samples_per_s": 250.0, "samples_per_s_spread": 0.1}]
    assert speedup(table) == {"speed-up: student ÷ teacher samples_per_s": "2.50×",
                              "teacher samples_per_s": "100.0 (interquartile range 20% of it)",
                              "student samples_per_s": "250.0 (interquartile range 10% of it)",
                              "size: teacher ÷ student parameters": "10.0×"}
    assert speedup(table[:1]) == {}  # no trained student row: nothing to compare
    assert flatten({"lr": 0.01, "early": {"metric": "acc", "patience": None}, "empty": {}}) == {
        "lr": 0.01, "early.metric": "acc"}
