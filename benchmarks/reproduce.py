"""Re-run the docs/results.md rows that take at most 5 minutes and compare their numbers with the stored ones
(issue #22 §6).

The store: one JSON file per results section in `docs/results/`, `{"section": heading, "anchor": its link in
docs/results.md, "rows": [row, ...]}`. A row holds

- `name` (unique over the store), `what` (one line) and optionally `note` (what a reader must know about the
  row, e.g. why its numbers differ from an older table);
- `commands`: argv lists run one after the other from the repository root. `python` stands for this
  interpreter, `potstill` for `python -m potstill.cli`, and `{out}` for the row's fresh output folder
  `runs/reproduce/<name>` (emptied first);
- `result`: the JSON file, relative to `{out}`, the numbers are read from (a run's summary.json, or what a
  benchmark script writes with `--json`);
- `seeds`, `threads` (what the command runs with), `seconds` (its wall time when recorded);
- `metrics`: metric → stored value; a metric is a `/`-separated path into the result JSON (in a list: a
  position, or the `model` of an item, as in summary.json's `table`);
- `tolerance`: metric → the largest absolute drift still counted as reproducing;
- `commit`: the git commit the numbers were recorded at (`-dirty` when the tree had uncommitted changes), or
  `unrecorded` with every stored value null: a row whose numbers were never recorded (a plain run skips it;
  named in `--only` its checks print NEW and do not fail; `--update` records them).

`python benchmarks/reproduce.py` re-runs every row (`--only NAME ...` some of them; `--list` lists them; `--jobs N`
runs N rows at once),
prints a table (row, metric, stored, fresh, drift, OK / DRIFT / MISSING) and exits 1 when any metric drifts
beyond its tolerance. `--update` writes the fresh numbers, the commit and the seconds back into the store
(atomically).

The Markdown tables of these rows live in docs/results.md between `<!-- reproduce:FILE begin -->` and
`<!-- reproduce:FILE end -->` markers, FILE being the store's file stem. `--markdown FILE` prints one block,
`--write-docs` rewrites every block from the store; tests/test_reproduce.py checks that the blocks and the
store agree.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STORE = REPO / "docs" / "results"
RESULTS_MD = REPO / "docs" / "results.md"
RUNS = REPO / "runs" / "reproduce"
BLOCK = re.compile(r"<!-- reproduce:(?P<name>[\w-]+) begin -->\n.*?<!-- reproduce:(?P=name) end -->", re.DOTALL)


@dataclass(frozen=True)
class Check:
    """One metric of one row: its stored and fresh value and whether the drift is within tolerance."""

    row: str
    metric: str
    stored: float | None
    fresh: float | None
    tolerance: float

    @property
    def drift(self) -> float | None:
        if self.stored is None or self.fresh is None:
            return None
        return self.fresh - self.stored

    @property
    def status(self) -> str:
        if self.fresh is None or (isinstance(self.fresh, float) and math.isnan(self.fresh)):
            return "MISSING"
        if self.stored is None:
            return "NEW"
        drift = self.drift
        assert drift is not None
        return "OK" if abs(drift) <= self.tolerance + 1e-12 else "DRIFT"


def lookup(result: Any, metric: str) -> float | None:
    """The number at `metric` in `result`, None when absent. `metric` is a `/`-separated path; in a list a part is
    a position, or the `model` of one of its items (summary.json's `table` rows: `table/student (after)/accuracy`)."""
    node = result
    for part in metric.split("/"):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, list) and any(isinstance(x, dict) and x.get("model") == part for x in node):
            node = next(x for x in node if isinstance(x, dict) and x.get("model") == part)
        else:
            return None
    if isinstance(node, bool) or not isinstance(node, int | float):
        return None
    return float(node)


def compare(row: dict[str, Any], result: Any) -> list[Check]:
    """One Check per metric in the row's tolerance map, the fresh numbers read from `result`."""
    stored = row.get("metrics", {})
    return [Check(row["name"], metric, stored.get(metric), lookup(result, metric), float(tol))
            for metric, tol in row["tolerance"].items()]


def failed(checks: list[Check]) -> bool:
    return any(c.status in ("DRIFT", "MISSING") for c in checks)


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "—"
    if math.isnan(value):
        return "nan"
    if value == int(value) and abs(value) >= 1:
        return f"{int(value)}"
    return f"{value:.{digits}f}"


def table(checks: list[Check]) -> str:
    """The comparison as a fixed-width text table."""
    lines = [f"{'row':24} {'metric':34} {'stored':>10} {'fresh':>10} {'drift':>10} {'tol':>8}  status"]
    for c in checks:
        drift = "—" if c.drift is None else f"{c.drift:+.4f}"
        lines.append(f"{c.row:24} {c.metric:34} {_fmt(c.stored):>10} {_fmt(c.fresh):>10} {drift:>10} "
                     f"{c.tolerance:>8.4g}  {c.status}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the store
def load_store(store: Path = STORE) -> dict[str, dict[str, Any]]:
    """File stem → that file's section (`section`, `anchor`, `rows`), in name order."""
    sections = {}
    for path in sorted(store.glob("*.json")):
        section = json.loads(path.read_text(encoding="utf-8"))
        for key in ("section", "anchor", "rows"):
            if key not in section:
                raise SystemExit(f"{path}: missing key {key!r}")
        for row in section["rows"]:
            for key in ("name", "commands", "result", "tolerance"):
                if key not in row:
                    raise SystemExit(f"{path}: row {row.get('name', '?')!r} has no {key!r}")
        sections[path.stem] = section
    names = [row["name"] for section in sections.values() for row in section["rows"]]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SystemExit(f"{store}: row names used twice: {', '.join(duplicates)}")
    return sections


def write_section(stem: str, section: dict[str, Any], store: Path = STORE) -> None:
    from potstill.io import atomic_write_json

    atomic_write_json(store / f"{stem}.json", section)


def current_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short=10", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


# ---------------------------------------------------------------------------------------------- running
def argv_of(command: list[str], out: Path) -> list[str]:
    """The argv to run: `python` is this interpreter, `potstill` its CLI, `{out}` the row's output folder."""
    head = {"python": [sys.executable], "potstill": [sys.executable, "-m", "potstill.cli"]}.get(command[0],
                                                                                                [command[0]])
    return head + [arg.replace("{out}", str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out))
                   for arg in command[1:]]


def run_row(row: dict[str, Any], runs: Path = RUNS, timeout: float | None = None) -> tuple[Any, float, str]:
    """Run the row's commands into a fresh `runs/<name>`; (result JSON or None, seconds, last output lines).
    A command still running after `timeout` seconds (from the row's start) is killed and the row fails."""
    out = runs / row["name"]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    log = out / "reproduce.log"
    for command in row["commands"]:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {' '.join(command)}\n")
            f.flush()
            left = None if timeout is None else max(1.0, timeout - (time.perf_counter() - started))
            try:
                done = subprocess.run(argv_of(command, out), cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                      check=False, timeout=left)
            except subprocess.TimeoutExpired:
                return None, time.perf_counter() - started, f"killed after {timeout:.0f} s (--timeout)"
        if done.returncode != 0:
            tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
            return None, time.perf_counter() - started, f"exit {done.returncode}:\n{tail}"
    seconds = time.perf_counter() - started
    result_path = out / row["result"]
    if not result_path.is_file():
        return None, seconds, f"no {result_path}"
    return json.loads(result_path.read_text(encoding="utf-8")), seconds, ""


# ---------------------------------------------------------------------------------------------- Markdown
def markdown(stem: str, section: dict[str, Any]) -> str:
    """The generated block of one store file: its rows' commands and a table of their stored numbers."""
    lines = [f"<!-- reproduce:{stem} begin -->",
             f"Generated from `docs/results/{stem}.json` by `python benchmarks/reproduce.py --write-docs`; "
             f"section: [{section['section']}](#{section['anchor']}).", ""]
    for row in section["rows"]:
        commands = " && ".join(" ".join(c) for c in row["commands"])
        seeds = " ".join(str(s) for s in row.get("seeds", [])) or "—"
        lines.append(f"- `{row['name']}`: {row.get('what', '')} `{commands}` (seeds {seeds}, "
                     f"threads {row.get('threads', '?')}, {_fmt(row.get('seconds'), 0)} s, "
                     f"recorded at {row.get('commit', '—')})" + (f". {row['note']}" if row.get("note") else ""))
    lines += ["", "| row | metric | value | tolerance |", "|---|---|---|---|"]
    for row in section["rows"]:
        for metric, tol in row["tolerance"].items():
            lines.append(f"| {row['name']} | {metric} | {_fmt(row.get('metrics', {}).get(metric))} | ± {tol:g} |")
    lines.append(f"<!-- reproduce:{stem} end -->")
    return "\n".join(lines)


def docs_blocks(text: str) -> dict[str, str]:
    """File stem → the block text found in docs/results.md."""
    return {m["name"]: m[0] for m in BLOCK.finditer(text)}


def write_docs(sections: dict[str, dict[str, Any]], path: Path = RESULTS_MD) -> list[str]:
    """Rewrite every marker block of `path` from the store; the stems with no block there are returned."""
    from potstill.io import atomic_write_text

    text = path.read_text(encoding="utf-8")
    found = docs_blocks(text)
    new = BLOCK.sub(lambda m: markdown(m["name"], sections[m["name"]]) if m["name"] in sections else m[0], text)
    if new != text:
        atomic_write_text(path, new)
    return [stem for stem in sections if stem not in found]


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="rows (or store files) to run")
    p.add_argument("--list", action="store_true", help="list the rows and their commands")
    p.add_argument("--update", action="store_true", help="store the fresh numbers and the commit")
    p.add_argument("--markdown", metavar="FILE", help="print the Markdown block of docs/results/FILE.json")
    p.add_argument("--write-docs", action="store_true", help="regenerate the blocks in docs/results.md")
    p.add_argument("--runs", type=Path, default=RUNS, help="where the rows' output folders go")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="kill a row that runs longer (it fails)")
    p.add_argument("--jobs", type=int, default=1, help="rows run at once (numbers do not depend on it; each row "
                                                       "pins its own threads)")
    args = p.parse_args(argv)
    sections = load_store()
    if args.markdown:
        if args.markdown not in sections:
            raise SystemExit(f"--markdown: no docs/results/{args.markdown}.json (have {', '.join(sections)})")
        print(markdown(args.markdown, sections[args.markdown]))
        return 0
    if args.write_docs:
        missing = write_docs(sections)
        if missing:
            print(f"no block in {RESULTS_MD.relative_to(REPO)} for: {', '.join(missing)}")
        return 0
    rows = [(stem, row) for stem, section in sections.items() for row in section["rows"]
            if not args.only or row["name"] in args.only or stem in args.only]
    if args.only:
        known = {row["name"] for section in sections.values() for row in section["rows"]} | set(sections)
        unknown = [n for n in args.only if n not in known]
        if unknown:
            raise SystemExit(f"--only: unknown row(s) {', '.join(unknown)}")
    if args.list:
        for stem, row in rows:
            commands = " && ".join(" ".join(c) for c in row["commands"])
            print(f"{row['name']:24} {stem:22} {row.get('commit', '—'):>12} ~{_fmt(row.get('seconds'), 0):>4} s  "
                  f"{commands}")
        return 0
    unrecorded = [row["name"] for _, row in rows if row.get("commit") == "unrecorded"]
    if unrecorded and not args.update and not args.only:  # nothing to compare them with
        rows = [(stem, row) for stem, row in rows if row["name"] not in unrecorded]
        print(f"not recorded yet, skipped (record with --update --only NAME): {', '.join(unrecorded)}")
    checks: list[Check] = []
    commit = current_commit()
    store_lock = threading.Lock()

    def run(stem: str, row: dict[str, Any]) -> list[Check]:
        print(f"[{row['name']}] {' && '.join(' '.join(c) for c in row['commands'])}", flush=True)
        result, seconds, error = run_row(row, args.runs, args.timeout)
        print(f"[{row['name']}] {seconds:.0f} s" + (f"  FAILED {error}" if error else ""), flush=True)
        row_checks = compare(row, result or {})
        if args.update and not error:  # stored at once, so rows already done survive a later interruption
            with store_lock:
                row["metrics"] = {c.metric: c.fresh for c in row_checks}
                row["commit"], row["seconds"] = commit, round(seconds)
                write_section(stem, sections[stem])
        return row_checks

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # each row is its own subprocess
        for row_checks in pool.map(lambda item: run(*item), rows):
            checks += row_checks
    print()
    print(table(checks))
    bad = [c for c in checks if c.status in ("DRIFT", "MISSING")]
    print(f"\n{len(checks) - len(bad)} of {len(checks)} metrics within tolerance" + (
        f"; {len(bad)} not: {', '.join(sorted({c.row for c in bad}))}" if bad else ""))
    if args.update:
        print("store updated; run `python benchmarks/reproduce.py --write-docs` to regenerate docs/results.md")
    return 1 if bad and not args.update else 0


if __name__ == "__main__":
    raise SystemExit(main())
