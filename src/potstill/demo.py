"""`potstill demo`: distil all-MiniLM-L6-v2 into a 2-layer student on BBC News and report before / after.

Runs the packaged `recipes/demo.yaml` (with any `--set` overrides), prints the teacher / student table and the
demo's two targets with their measured values, and writes `<run>/demo.json` and `<run>/report.html`.
"""

from __future__ import annotations

import time
from typing import Any

# The demo's targets. They are measured on every run and reported as PASS / MISS, never enforced.
MIN_PROBE_GAIN_POINTS = 1.5  # student after vs student before, BBC topic linear-probe accuracy
MIN_SPEEDUP = 3.0  # student vs teacher encode throughput (sentences/s, same texts, same max_length)

# summary-table key -> column heading in the printed table and the report
COLUMNS = {
    "model": "model",
    "probe_accuracy": "probe acc",
    "similarity_spearman": "Lee ρ",
    "cosine_to_teacher": "cos→teacher",
    "neighbour_recall@10": "recall@10",
    "sentences_per_s": "sentences/s",
    "speedup": "speed-up",
    "params": "params",
}


def _row(rows: list[dict], model: str) -> dict:
    return next((r for r in rows if r.get("model") == model), {})


def add_speedup(rows: list[dict]) -> list[dict]:
    """Rows with `speedup` = sentences/s ÷ the teacher's (when throughput was measured)."""
    base = _row(rows, "teacher").get("sentences_per_s")
    return [{**r, "speedup": r["sentences_per_s"] / base} if base and r.get("sentences_per_s") else dict(r)
            for r in rows]


def readable(rows: list[dict]) -> list[dict]:
    """The rows with the demo's column headings, in the demo's column order."""
    return [{label: r[key] for key, label in COLUMNS.items() if key in r} for r in rows]


def check_targets(rows: list[dict]) -> list[dict]:
    """Each target with its measured value and whether it was met (None when it could not be measured)."""
    before, after = _row(rows, "student (before)"), _row(rows, "student (after)")
    gain = (100 * (after["probe_accuracy"] - before["probe_accuracy"])
            if "probe_accuracy" in before and "probe_accuracy" in after else None)
    speedup = after.get("speedup")
    return [
        {"target": "BBC probe accuracy, student after − before", "required": f"≥ +{MIN_PROBE_GAIN_POINTS:g} points",
         "measured": None if gain is None else f"{gain:+.1f} points",
         "met": None if gain is None else gain >= MIN_PROBE_GAIN_POINTS},
        {"target": "encode throughput, student ÷ teacher", "required": f"≥ {MIN_SPEEDUP:g}×",
         "measured": None if speedup is None else f"{speedup:.2f}×",
         "met": None if speedup is None else speedup >= MIN_SPEEDUP},
    ]


def _verdict(met: bool | None) -> str:
    return {True: "PASS", False: "MISS", None: "not measured"}[met]


def _target_line(t: dict) -> str:
    return f"target: {t['target']} {t['required']}: measured {t['measured'] or '—'} → {_verdict(t['met'])}"


def _source(src: Any) -> str:
    """A data source in words, e.g. "builtin:bbc (test split, first 600)"."""
    if src is None:
        return "(none)"
    extra = [f"{src.split} split"] if src.split else []
    extra += [f"first {src.limit:,}"] if src.limit else []
    return f"{src.path} ({', '.join(extra)})" if extra else src.path


def run_demo(overrides: list[str]) -> dict[str, Any]:
    """Run the demo recipe with `--set` overrides; print and save the table and targets; return demo.json."""
    from rich.console import Console

    from potstill.config import load_recipe
    from potstill.io import atomic_write_json
    from potstill.recipes import packaged_recipe
    from potstill.report import rich_table, write_report
    from potstill.train import run_recipe

    start = time.perf_counter()
    recipe = load_recipe(packaged_recipe("demo"), overrides)
    summary = run_recipe(recipe, overwrite=True)
    if not summary:  # not the main process of a multi-process launch
        return {}
    rows = add_speedup(summary["table"])
    targets = check_targets(rows)
    total = time.perf_counter() - start
    timings = {"total_seconds": total, "train_seconds": summary.get("train_seconds"),
               "steps": summary.get("steps")}

    title = "all-MiniLM-L6-v2 → 2-layer student, BBC News"
    out = Console()
    if not out.is_terminal:  # logs and pipes: room for the whole table instead of rich's 80 columns
        out.width = 120
    out.print(rich_table(title, readable(rows)))
    for t in targets:
        out.print(_target_line(t))
    wall = f"total wall time {total:.0f} s (training {timings['train_seconds'] or 0:.0f} s)"
    out.print(f"{wall}; report: {recipe.run_dir / 'report.html'}")

    result = {"table": rows, "targets": targets, "timings": timings, "student_dir": summary.get("student_dir")}
    atomic_write_json(recipe.run_dir / "demo.json", result)
    ev = recipe.eval
    write_report(
        recipe.run_dir, title=f"potstill demo: {title}",
        tables=[("teacher / student before / student after", readable(rows)),
                ("targets", [{**{k: v for k, v in t.items() if k != "met"}, "result": _verdict(t["met"])}
                             for t in targets])],
        summary={"total wall time (s)": total, **{k: v for k, v in summary.items() if k != "table"}},
        notes=[f"trained on {_source(recipe.data.train)}, max_length {recipe.data.max_length}",
               f"probe acc: linear probe for the BBC topics, fit on {_source(ev.probe_train)}, "
               f"scored on {_source(ev.probe_test)}",
               f"Lee ρ: Spearman between embedding cosines and human similarity ratings, {_source(ev.pairs)}",
               f"cos→teacher and recall@10 (share of the teacher's 10 nearest neighbours the student keeps): "
               f"{_source(recipe.data.eval)}",
               "sentences/s: teacher and student measured interleaved on the same texts at the same max_length; "
               "speed-up is relative to the teacher",
               *(_target_line(t) for t in targets), wall],
    )
    return result
