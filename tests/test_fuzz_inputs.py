"""Property-based fuzzing (hypothesis) of everything a run checks before training (issue #22): random mutations
of a valid recipe (wrong types, out-of-bound numbers, missing and extra keys, damaged bytes) and random bad data
files (bad encodings, ragged rows, bad features and labels). Every outcome is success or a `UserError` whose
message is one line; no other exception, and nothing is written to the run folder. No model is loaded: the path
driven is recipe loading, the pre-flight checks of `potstill.train.run` and the task's record checks."""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from potstill.config import load_recipe
from potstill.errors import UserError
from potstill.tasks import build_task
from potstill.train.run import check_factory_kwargs, check_output_dir

VALID: dict[str, Any] = {
    "name": "fuzz",
    "task": "classification",
    "seed": 0,
    "teacher": {"factory": "potstill.examples.digits:mlp", "kwargs": {"hidden": 8}},
    "student": {"init": "factory", "factory": "potstill.examples.digits:mlp", "kwargs": {"hidden": 4, "depth": 1}},
    "data": {"train": {"path": "train.jsonl", "limit": 50}, "eval": "train.jsonl"},
    "objectives": [{"name": "forward_kl", "weight": 1.0, "params": {"temperature": 2.0, "scale_t2": True}}],
    "trainer": {"max_steps": 2, "batch_size": 4, "lr": 0.01, "betas": [0.9, 0.99], "log_every": 1},
    "eval": {"compare_before": False, "throughput": False},
}
ROW = {"features": [0.5] * 64, "label": 3}

# no ':' in generated text: a mutated `factory` never imports a module (only 'module:function' does)
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_./- 0123456789", max_size=8)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), words,
    st.sampled_from(["no", "yes", "off", "on", "", "1e300", ".inf", "builtin:digits", "train.jsonl", "-1"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(words, scalars, max_size=2))


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in the recipe (sections and leaves)."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append((*prefix, key))
            out.extend(_paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.append((*prefix, i))
            out.extend(_paths(value, (*prefix, i)))
    return out


PATHS = _paths(VALID)


@st.composite
def mutated_recipes(draw) -> dict:
    raw = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(0, 3))):  # 0: the data file alone is under test
        path = draw(st.sampled_from(PATHS))
        parent: Any = raw
        try:
            for key in path[:-1]:
                parent = parent[key]
            last = path[-1]
            action = draw(st.sampled_from(["replace", "delete", "extra"]))
            if action == "replace":
                parent[last] = draw(values)
            elif action == "delete" and isinstance(parent, dict):
                del parent[last]
            elif isinstance(parent, dict):
                parent[draw(words)] = draw(values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path's parent
    return raw


def _row_mutations() -> st.SearchStrategy[dict]:
    bad_features = st.one_of(st.lists(st.floats(-1, 1), max_size=70), st.just("0,1,2"),
                             st.lists(scalars, min_size=64, max_size=64), scalars)
    bad_labels = st.one_of(scalars, st.integers(-5, 20), st.just([1]))
    return st.one_of(
        st.builds(lambda f: {**ROW, "features": f}, bad_features),
        st.builds(lambda lab: {**ROW, "label": lab}, bad_labels),
        st.builds(lambda k: {k: 1}, words),
    )


@st.composite
def data_files(draw) -> bytes:
    rows = [dict(ROW, label=i % 10) for i in range(draw(st.integers(0, 6)))]
    for _ in range(draw(st.integers(0, 2))):
        rows.insert(draw(st.integers(0, len(rows))), draw(_row_mutations()))
    lines = []
    for row in rows:
        lines.append(json.dumps(row, allow_nan=True).encode())
    data = b"\n".join(lines) + b"\n"
    if draw(st.booleans()):  # damage the bytes: an invalid UTF-8 byte, a cut, or a stray character
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"", b"{", b"\x00", b"\n\n"])) + data[at:]
    return data


def _recipe_bytes(raw: dict, damage: int | None, byte: bytes) -> bytes:
    text = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True).encode()
    if damage is not None:
        at = damage % (len(text) + 1)
        text = text[:at] + byte + text[at:]
    return text


def _check(folder: Path, recipe_text: bytes, data: bytes) -> str:
    """Load and check as `potstill run` does before training: "ok" or the UserError's message."""
    (folder / "recipe.yaml").write_bytes(recipe_text)
    (folder / "train.jsonl").write_bytes(data)
    try:
        recipe = load_recipe(folder / "recipe.yaml")
        recipe.output_dir = str(folder / "runs")  # never the working directory
        check_output_dir(recipe)
        check_factory_kwargs(recipe)
        build_task(recipe, run_dir=recipe.run_dir).check_records()
    except UserError as exc:
        return str(exc)
    return "ok"


@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(raw=mutated_recipes(), data=data_files(),
       damage=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 10_000)),
       byte=st.sampled_from([b"\xff", b"\xe9", b": ", b"\t", b"{", b"- ", b"\n  x: 1\n"]))
def test_bad_recipes_and_data_end_in_success_or_one_line(raw, data, damage, byte):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        outcome = _check(folder, _recipe_bytes(raw, damage, byte), data)
        assert "\n" not in outcome, outcome
        assert outcome == "ok" or outcome.strip(), "an empty error message"
        assert not (folder / "runs").exists(), "something was written before training"


def test_the_unmutated_recipe_and_data_pass(tmp_path):
    data = b"".join(json.dumps(dict(ROW, label=i)).encode() + b"\n" for i in range(10))
    assert _check(tmp_path, _recipe_bytes(VALID, None, b""), data) == "ok"


def test_a_mutation_is_reported_in_one_line(tmp_path):
    raw = copy.deepcopy(VALID)
    raw["objectives"][0]["params"]["temperature"] = -math.inf
    message = _check(tmp_path, _recipe_bytes(raw, None, b""), json.dumps(ROW).encode())
    assert "field objectives.0.params.temperature" in message and "\n" not in message
