"""The method catalogue: every entry's code, recipe and results anchor exist; README's tables are generated."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from potstill.methods import KINDS, METHODS, github_slug, methods_command, render_readme

ROOT = Path(__file__).resolve().parents[1]


def _params():
    for method in METHODS.values():
        yield pytest.param(method, id=method.name)


def _result_anchors() -> set[str]:
    text = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    headings = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
    return {f"docs/results.md#{github_slug(h)}" for h in headings}


@pytest.mark.parametrize("method", list(_params()))
def test_code_exists(method):
    module = importlib.import_module(method.module)
    assert hasattr(module, method.attribute), f"{method.name}: {method.module} has no {method.attribute}"
    assert method.load() is getattr(module, method.attribute)


@pytest.mark.parametrize("method", list(METHODS.values()), ids=list(METHODS))
def test_recipe_and_results_exist(method):
    assert method.kind in KINDS
    assert method.paper and 1990 < method.year < 2100
    if method.recipe is not None:
        assert method.recipe.startswith(("src/potstill/recipes/", "benchmarks/")), method.recipe
        assert (ROOT / method.recipe).is_file(), f"{method.name}: no file {method.recipe}"
    if method.results is not None:
        assert method.results in _result_anchors(), f"{method.name}: no heading for {method.results}"


def test_github_slug():
    assert github_slug("SmolLM2-135M-Instruct → 7-layer slice (`recipes/smollm2-slice.yaml`)") == \
        "smollm2-135m-instruct--7-layer-slice-recipessmollm2-sliceyaml"
    assert github_slug("Interpolation vs extrapolation (ReSTTest-style split, methods-b §25)") == \
        "interpolation-vs-extrapolation-resttest-style-split-methods-b-25"


def test_readme_tables_are_generated():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert render_readme(readme) == readme, "README tables are stale: run `python -m potstill.methods --write-readme`"


def test_render_readme_needs_markers():
    with pytest.raises(ValueError, match="methods:start"):
        render_readme("no markers here")


def test_methods_command_table(capsys):
    methods_command(json_output=False)
    out = capsys.readouterr().out
    lines = out.splitlines()
    for method in METHODS.values():
        # One row per method, whole (not wrapped or cut at the terminal width), so `| grep` finds it.
        assert any(method.name in line and method.target in line and method.paper in line for line in lines), \
            method.name


def test_methods_command_json(capsys):
    methods_command(json_output=True)
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == list(METHODS)
    first = METHODS[rows[0]["name"]]
    assert rows[0] == {"name": first.name, "paper": first.paper, "year": first.year, "kind": first.kind,
                       "module": first.module, "attribute": first.attribute, "recipe": first.recipe,
                       "results": first.results, "target": first.target}
