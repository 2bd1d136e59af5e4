"""benchmarks/reproduce.py (issue #22 §6): the tolerance logic on tiny dicts, and the store in docs/results/ against
the generated blocks of docs/results.md. Nothing here trains."""

from __future__ import annotations

import json
import sys
from types import ModuleType

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def reproduce() -> ModuleType:
    return load_benchmark("reproduce")


def test_lookup_follows_slash_paths_and_list_positions(reproduce):
    result = {"ladder": {"128": {"fkl": {"kl": 0.25}}}, "runs": [{"acc": 0.5}, {"acc": 0.75}], "flag": True,
              "name": "x", "steps": 3}
    assert reproduce.lookup(result, "ladder/128/fkl/kl") == 0.25
    assert reproduce.lookup(result, "runs/1/acc") == 0.75
    assert reproduce.lookup(result, "steps") == 3.0
    assert reproduce.lookup(result, "runs/2/acc") is None  # past the end
    assert reproduce.lookup(result, "ladder/64/fkl/kl") is None
    assert reproduce.lookup(result, "flag") is None  # a bool is not a number
    assert reproduce.lookup(result, "name") is None
    assert reproduce.lookup(result, "ladder/128") is None  # a dict is not a number
    table = {"table": [{"model": "teacher", "acc": 0.9}, {"model": "student (after)", "acc": 0.8}]}
    assert reproduce.lookup(table, "table/student (after)/acc") == 0.8
    assert reproduce.lookup(table, "table/student (before)/acc") is None


def test_compare_within_beyond_and_missing(reproduce):
    row = {"name": "r", "metrics": {"a": 0.50, "b": 0.50, "c": 0.50, "d": None},
           "tolerance": {"a": 0.01, "b": 0.01, "c": 0.01, "d": 0.01}}
    checks = {c.metric: c for c in reproduce.compare(row, {"a": 0.505, "b": 0.52, "d": 0.3})}
    assert checks["a"].status == "OK" and checks["a"].drift == pytest.approx(0.005)
    assert checks["b"].status == "DRIFT" and checks["b"].drift == pytest.approx(0.02)
    assert checks["c"].status == "MISSING" and checks["c"].drift is None
    assert checks["d"].status == "NEW"
    assert reproduce.failed(list(checks.values()))
    assert not reproduce.failed([checks["a"], checks["d"]])


def test_tolerance_is_absolute_and_inclusive(reproduce):
    row = {"name": "r", "metrics": {"m": 0.9}, "tolerance": {"m": 0.25}}
    assert reproduce.compare(row, {"m": 1.15})[0].status == "OK"  # drift 0.25, exactly the tolerance
    assert reproduce.compare(row, {"m": 0.65})[0].status == "OK"  # −0.25
    assert reproduce.compare(row, {"m": 1.16})[0].status == "DRIFT"
    exact = {"name": "r", "metrics": {"m": 2.0}, "tolerance": {"m": 0.0}}
    assert reproduce.compare(exact, {"m": 2.0})[0].status == "OK"
    assert reproduce.compare(exact, {"m": 2.001})[0].status == "DRIFT"


def test_table_lists_each_check(reproduce):
    row = {"name": "tiny", "metrics": {"acc": 0.5}, "tolerance": {"acc": 0.01}}
    text = reproduce.table(reproduce.compare(row, {"acc": 0.53}))
    line = text.splitlines()[1].split()
    assert line == ["tiny", "acc", "0.5000", "0.5300", "+0.0300", "0.01", "DRIFT"]


def test_argv_of_expands_the_interpreter_cli_and_out(reproduce, tmp_path):
    out = reproduce.REPO / "runs" / "reproduce" / "x"
    assert reproduce.argv_of(["python", "b.py", "--json", "{out}/r.json"], out) == [
        sys.executable, "b.py", "--json", "runs/reproduce/x/r.json"]
    assert reproduce.argv_of(["potstill", "run", "--set", "output_dir={out}"], tmp_path)[:3] == [
        sys.executable, "-m", "potstill.cli"]
    assert reproduce.argv_of(["potstill", "run", "--set", "output_dir={out}"], tmp_path)[-1] == f"output_dir={tmp_path}"


def test_run_row_reads_the_result_of_a_fresh_folder(reproduce, tmp_path):
    write = "import json, sys; json.dump({'acc': 0.75}, open(sys.argv[1], 'w'))"
    row = {"name": "tiny", "commands": [["python", "-c", write, "{out}/r.json"]], "result": "r.json"}
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "stale.json").write_text("{}")
    result, _, error = reproduce.run_row(row, tmp_path)
    assert (result, error) == ({"acc": 0.75}, "")
    assert not (tmp_path / "tiny" / "stale.json").exists()
    failing = {"name": "bad", "commands": [["python", "-c", "raise SystemExit(3)"]], "result": "r.json"}
    result, _, error = reproduce.run_row(failing, tmp_path)
    assert result is None and error.startswith("exit 3")


def test_run_row_kills_a_row_past_its_timeout(reproduce, tmp_path):
    row = {"name": "slow", "commands": [["python", "-c", "import time; time.sleep(120)"]], "result": "r.json"}
    result, _, error = reproduce.run_row(row, tmp_path, timeout=1)
    assert result is None and error.startswith("killed after 1 s")


def test_write_docs_replaces_only_the_marked_block(reproduce, tmp_path):
    section = {"section": "S", "anchor": "s", "rows": [
        {"name": "r", "commands": [["python", "x.py"]], "result": "r.json", "seeds": [0], "threads": 1,
         "seconds": 12, "commit": "abc", "metrics": {"acc": 0.5}, "tolerance": {"acc": 0.01}}]}
    doc = tmp_path / "results.md"
    doc.write_text("# R\n\nbefore\n<!-- reproduce:s begin -->\nstale\n<!-- reproduce:s end -->\nafter\n")
    assert reproduce.write_docs({"s": section, "other": section}, doc) == ["other"]
    text = doc.read_text()
    assert text.startswith("# R\n\nbefore\n<!-- reproduce:s begin -->\n") and text.endswith("end -->\nafter\n")
    assert "stale" not in text and "| r | acc | 0.5000 | ± 0.01 |" in text
    assert reproduce.docs_blocks(text) == {"s": reproduce.markdown("s", section)}
    section["rows"][0]["note"] = "Why it moved."
    assert "recorded at abc). Why it moved." in reproduce.markdown("s", section)


def test_heading_anchor_matches_github(reproduce):
    assert reproduce.heading_anchor("TAID vs FKL / RKL (`benchmarks/claim_taid.py`)") == \
        "taid-vs-fkl--rkl-benchmarksclaim_taidpy"


# ------------------------------------------------------------------------------------------ the real store
def test_store_rows_are_complete(reproduce):
    sections = reproduce.load_store()
    assert sections, "docs/results/ holds no store file"
    for stem, section in sections.items():
        for row in section["rows"]:
            where = f"docs/results/{stem}.json row {row['name']}"
            assert row["commands"] and all(isinstance(c, list) and c for c in row["commands"]), where
            assert set(row["metrics"]) == set(row["tolerance"]), where
            if row["commit"] == "unrecorded":  # a row waiting for its first --update: no numbers yet
                assert all(v is None for v in row["metrics"].values()), where
            else:
                assert all(isinstance(v, int | float) for v in row["metrics"].values()), where
            assert all(t >= 0 for t in row["tolerance"].values()), where
            assert row["commit"] and isinstance(row["seeds"], list), where
            assert any("{out}" in arg for c in row["commands"] for arg in c), f"{where}: output not under {{out}}"


def test_store_anchors_name_headings_of_results_md(reproduce):
    headings = {reproduce.heading_anchor(line.lstrip("#")) for line in
                reproduce.RESULTS_MD.read_text(encoding="utf-8").splitlines() if line.startswith("#")}
    for stem, section in reproduce.load_store().items():
        assert section["anchor"] in headings, stem


def test_results_md_blocks_agree_with_the_store(reproduce):
    """docs/results.md shows exactly what docs/results/*.json holds (run --write-docs after --update)."""
    sections = reproduce.load_store()
    blocks = reproduce.docs_blocks(reproduce.RESULTS_MD.read_text(encoding="utf-8"))
    assert set(blocks) == set(sections)
    for stem, section in sections.items():
        assert blocks[stem] == reproduce.markdown(stem, section), f"docs/results.md block {stem} is stale"


def test_store_files_are_the_atomic_writers_format(reproduce):
    """Each file is what write_section writes (sorted keys, indent 2), so --update leaves no spurious diff."""
    for path in sorted(reproduce.STORE.glob("*.json")):
        text = path.read_text(encoding="utf-8")
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n", path.name
