"""Run reports: read `metrics.jsonl`, plot the loss and evaluation curves, write a self-contained `report.html`
(inline CSS, the plot embedded as a base64 PNG, no scripts, no external resources).

Tables are lists of row dicts; the columns are the union of the rows' keys in first-seen order, and every
cell goes through `format_value` (shared by the HTML and the terminal `rich_table`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import numbers
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.table import Table

from potstill.errors import UserError
from potstill.io import atomic_write_bytes, atomic_write_text

__all__ = ["format_value", "plot_loss_curve", "read_metrics", "rich_table", "table_columns", "write_report"]

LOSS_CURVE_NAME = "loss_curve.png"
REPORT_NAME = "report.html"
EMPTY_CELL = "—"


# ------------------------------------------------------------------------------------------ formatting
def _plain(value: Any) -> Any:
    """numpy / torch scalars as python scalars; everything else unchanged."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        try:
            return value.item()
        except (TypeError, ValueError, RuntimeError):
            return value
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def format_value(value: Any) -> str:
    """One cell as text.

    ints get thousands separators; floats get 3 decimals below 10, 1 decimal with thousands separators
    from 10 up, and scientific notation when tiny (e.g. learning rates); None is a dash.
    """
    value = _plain(value)
    if value is None:
        return EMPTY_CELL
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        a = abs(v)
        if a == 0:
            return "0.000"
        if a < 1e-3:
            return f"{v:.2e}"
        if a < 10:
            return f"{v:.3f}"
        return f"{v:,.1f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, default=str, sort_keys=True)
    return str(value)


def table_columns(rows: list[dict]) -> list[str]:
    """Union of the rows' keys, in first-seen order."""
    cols: dict[str, None] = {}
    for row in rows:
        for key in row:
            cols.setdefault(str(key), None)
    return list(cols)


def _cell(row: dict, col: str) -> Any:
    if col in row:
        return row[col]
    for key, value in row.items():  # non-str keys were stringified by table_columns
        if str(key) == col:
            return value
    return None


def _numeric_columns(rows: list[dict], cols: list[str]) -> set[str]:
    """Columns whose present, non-None values are all numbers (right-aligned)."""
    out = set()
    for col in cols:
        vals = [_plain(_cell(r, col)) for r in rows]
        vals = [v for v in vals if v is not None]
        if vals and all(_is_number(v) for v in vals):
            out.add(col)
    return out


# ---------------------------------------------------------------------------------------- metrics file
def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a `metrics.jsonl` file, one JSON object per line.

    Blank lines are skipped, and so is an unparsable *last* line (a run killed mid-write leaves one);
    an unparsable line anywhere else is a `UserError`.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise UserError(f"{path}: metrics file not found") from None
    lines = [(i, line) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
    records: list[dict] = []
    for pos, (lineno, line) in enumerate(lines):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if pos == len(lines) - 1:
                break  # truncated final line
            raise UserError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            if pos == len(lines) - 1:
                break
            raise UserError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
        records.append(obj)
    return records


# ---------------------------------------------------------------------------------------------- plot
def _finite_number(value: Any) -> float | None:
    value = _plain(value)
    if _is_number(value) and math.isfinite(float(value)):
        return float(value)
    return None


def _moving_average(ys: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_loss_curve(records: list[dict], path: str | os.PathLike) -> Path | None:
    """Plot training loss (`step` vs `loss`) and any `eval/...` values against `step`; save a PNG.

    Eval values go on a second panel under the loss, one marked line per key. Returns the path, or
    None (and writes nothing) when no record has anything to plot.
    """
    train_x: list[float] = []
    train_y: list[float] = []
    evals: dict[str, tuple[list[float], list[float]]] = {}
    for rec in records:
        if not isinstance(rec, dict):
            continue
        step = _finite_number(rec.get("step"))
        if step is None:
            continue
        loss = _finite_number(rec.get("loss"))
        if loss is not None:
            train_x.append(step)
            train_y.append(loss)
        for key, value in rec.items():
            if isinstance(key, str) and key.startswith("eval/"):
                v = _finite_number(value)
                if v is not None:
                    xs, ys = evals.setdefault(key, ([], []))
                    xs.append(step)
                    ys.append(v)
    if not train_x and not evals:
        return None

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = int(bool(train_x)) + int(bool(evals))
    fig = Figure(figsize=(8, 3.6 * panels), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    i = 0
    if train_x:
        ax = axes[i]
        i += 1
        smooth = len(train_y) >= 50
        ax.plot(train_x, train_y, color="tab:blue", lw=1, alpha=0.35 if smooth else 1.0, label="train loss")
        if smooth:
            window = max(5, len(train_y) // 50)
            ax.plot(
                train_x,
                _moving_average(train_y, window),
                color="tab:blue",
                lw=1.8,
                label=f"train loss (moving avg, {window} points)",
            )
        ax.set_ylabel("loss")
        ax.set_title("Training loss")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    if evals:
        ax = axes[i]
        for key, (xs, ys) in sorted(evals.items()):
            ax.plot(xs, ys, marker="o", ms=4, lw=1, label=key.removeprefix("eval/"))
        ax.set_ylabel("value")
        ax.set_title("Evaluation")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("step")

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------- html
_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --head: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; padding: 2rem 1rem 4rem; color: var(--fg); background: #fff;
       font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
main { max-width: 980px; margin: 0 auto; }
h1 { font-size: 1.7rem; margin: 0 0 .2rem; }
h2 { font-size: 1.2rem; margin: 2.2rem 0 .6rem; padding-bottom: .3rem; border-bottom: 1px solid var(--line); }
.meta { color: var(--muted); font-size: .9rem; margin: 0 0 1.5rem; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; margin: .3rem 0 1rem; font-size: .92rem; }
caption { caption-side: top; text-align: left; font-size: 1.1rem; font-weight: 600; padding: 1.4rem 0 .4rem; }
th, td { border: 1px solid var(--line); padding: .35rem .7rem; vertical-align: top; }
th { background: var(--head); text-align: left; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fbfcfd; }
table.kv th { width: 16rem; }
figure { margin: .5rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: .85rem; }
ul.notes li { margin: .25rem 0; }
footer { margin-top: 3rem; color: var(--muted); font-size: .8rem; }
"""


_NUM = ' class="num"'


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _html_table(caption: str, rows: list[dict]) -> str:
    cols = table_columns(rows)
    numeric = _numeric_columns(rows, cols)
    out = ['<div class="table-wrap"><table>', f"<caption>{_esc(caption)}</caption>"]
    if not rows or not cols:
        out.append("<tbody><tr><td>(no rows)</td></tr></tbody></table></div>")
        return "\n".join(out)
    head = "".join(f"<th{_NUM if c in numeric else ''}>{_esc(c)}</th>" for c in cols)
    out.append(f"<thead><tr>{head}</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        cells = "".join(
            f"<td{_NUM if c in numeric else ''}>{_esc(format_value(_cell(row, c)))}</td>" for c in cols
        )
        out.append(f"<tr>{cells}</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _kv_table(summary: dict) -> str:
    out = ['<div class="table-wrap"><table class="kv"><tbody>']
    for key, value in summary.items():
        cls = _NUM if _is_number(_plain(value)) else ""
        out.append(f"<tr><th>{_esc(key)}</th><td{cls}>{_esc(format_value(value))}</td></tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _figure(image: Path) -> str:
    """The plot as an <img> whose source is the PNG itself (a data: URI), so the page needs no other file."""
    data = base64.b64encode(image.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="Training loss and evaluation metrics by step">'
            f'<figcaption>Also saved next to this page as <a href="{_esc(image.name)}">{_esc(image.name)}</a>'
            "</figcaption></figure>")


def write_report(
    run_dir: str | os.PathLike,
    *,
    title: str,
    tables: list[tuple[str, list[dict]]] | None = None,
    metrics_path: str | os.PathLike | None = None,
    notes: list[str] | None = None,
    summary: dict | None = None,
    sections: list[tuple[str, dict]] | None = None,
    details: list[tuple[str, dict]] | None = None,
) -> Path:
    """Write `run_dir/report.html` (and `run_dir/loss_curve.png` when there is a curve); return the HTML path.

    The curve comes from `metrics_path`, by default `run_dir/metrics.jsonl` when it exists. `sections` are headed
    key/value tables shown after the summary (e.g. the models, the speed-up), `details` more of them after the plot
    (e.g. the hyper-parameters). The page is
    self-contained: inline CSS, the plot embedded as a base64 PNG, no scripts, no external resources.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if metrics_path is None:
        default = run_dir / "metrics.jsonl"
        metrics_path = default if default.exists() else None
    image: Path | None = None
    if metrics_path is not None:
        image = plot_loss_curve(read_metrics(metrics_path), run_dir / LOSS_CURVE_NAME)

    generated = datetime.now(timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body><main>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="meta">Generated {_esc(generated)} by potstill</p>',
    ]
    if summary:
        parts += ["<h2>Summary</h2>", _kv_table(summary)]
    for heading, values in sections or []:
        parts += [f"<h2>{_esc(heading)}</h2>", _kv_table(values)]
    for caption, rows in tables or []:
        parts.append(_html_table(caption, list(rows)))
    if image is not None:
        parts += ["<h2>Training and evaluation curves</h2>", _figure(image)]
    for heading, values in details or []:
        parts += [f"<h2>{_esc(heading)}</h2>", _kv_table(values)]
    if notes:
        items = "\n".join(f"<li>{_esc(n)}</li>" for n in notes)
        parts += ["<h2>Notes</h2>", f'<ul class="notes">\n{items}\n</ul>']
    parts += ["<footer>potstill report</footer>", "</main></body>", "</html>", ""]
    return atomic_write_text(run_dir / REPORT_NAME, "\n".join(parts))


# ---------------------------------------------------------------------------------------------- rich
def rich_table(title: str, rows: list[dict]) -> Table:
    """The same table for the terminal, as a `rich.table.Table`."""
    cols = table_columns(rows)
    numeric = _numeric_columns(rows, cols)
    table = Table(title=title)
    for col in cols:
        table.add_column(col, justify="right" if col in numeric else "left")
    for row in rows:
        table.add_row(*(format_value(_cell(row, c)) for c in cols))
    return table
