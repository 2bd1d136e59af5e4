"""DistillWeighted through `potstill run`: `teacher.sources` of an embedding recipe, the sources' weighted
concatenation (`potstill.teachers.ensemble.weighted_concatenation`) and the recipe `potstill search --teachers`
writes for it."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import embedding_recipe, numbered_texts_jsonl, tiny_bert_encoder, write_yaml

from potstill.config import load_recipe, validate_recipe
from potstill.errors import UserError
from potstill.teachers.ensemble import weighted_concatenation

TEXTS = ["the cat purrs on the warm sofa", "shares fell sharply after the report", "a puppy chews a bone",
         "the bank raised interest rates", "the horse grazes in the field", "oil prices rose again today",
         "kittens chase a ball of wool", "the stock index closed at a record"]


def test_one_squared_error_on_the_concatenation_is_the_weighted_sum_of_per_source_errors():
    torch.manual_seed(0)
    n, d = 5, 4
    student = torch.randn(n, d)
    sources = [torch.randn(n, 3) * 10, torch.randn(n, 6)]
    heads = [torch.randn(3, d), torch.randn(6, d)]
    w = torch.tensor([0.3, 0.7])
    unit = [s / s.norm(dim=1, keepdim=True) for s in sources]
    by_hand = sum(w[s] * ((student @ heads[s].T - unit[s]) ** 2).sum() for s in range(2))
    target = weighted_concatenation(sources, [3.0, 7.0])  # weights are normalised: 0.3, 0.7
    # the stacked heads of the concatenation: each source's head scaled as its vectors are
    stacked = torch.cat([heads[s] * torch.sqrt(w[s]) for s in range(2)])
    assert target.shape == (n, 9)
    assert torch.allclose(target.norm(dim=1), torch.ones(n))
    assert ((student @ stacked.T - target) ** 2).sum() == pytest.approx(float(by_hand), rel=1e-5)


def test_one_source_of_weight_one_is_its_unit_vectors():
    vectors = torch.randn(4, 8)
    assert torch.allclose(weighted_concatenation([vectors], [2.5]), vectors / vectors.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("vectors, weights, message", [
    ([], [], "at least one source"),
    ([torch.zeros(2, 3)], [1.0, 2.0], "1 sources but 2 weights"),
    ([torch.zeros(2, 3), torch.zeros(2, 3)], [1.0, 0.0], "positive"),
    ([torch.zeros(2, 3), torch.zeros(3, 3)], [1.0, 1.0], "same n rows"),
])
def test_bad_sources_are_refused(vectors, weights, message):
    with pytest.raises(ValueError, match=message):
        weighted_concatenation(vectors, weights)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("weighted")
    teacher = tiny_bert_encoder(root / "teacher", 2)  # 32 wide
    wide = tiny_bert_encoder(root / "wide", 1, hidden_size=48, seed=1)
    train = numbered_texts_jsonl(root / "train.jsonl", TEXTS * 2)
    return root, teacher, wide, train


def _raw(zoo, name: str, **changes) -> dict:
    root, teacher, wide, train = zoo
    raw = embedding_recipe(root, teacher, train, name=name, student={"init": "layers_from_teacher", "layers": [0]},
                           objectives=[{"name": "embedding_mse"}], max_steps=4, lr=1e-3)
    raw["teacher"]["sources"] = [{"path": str(teacher), "weight": 0.25}, {"path": str(wide), "weight": 0.75}]
    for key, value in changes.items():
        section, field = key.split("__")
        raw[section][field] = value
    return raw


def test_a_weighted_run_distils_the_concatenation_through_one_learned_head(zoo):
    from potstill.train.run import fit_recipe

    recipe = validate_recipe(_raw(zoo, "weighted", trainer__log_every=1, data__eval=str(zoo[3])))
    task, distiller, summary = fit_recipe(recipe)
    target = task.teacher_cache
    assert target.shape == (len(TEXTS) * 2, 32 + 48)
    manifest = json.loads((recipe.run_dir / "teacher_cache" / "manifest.json").read_text())
    assert [s["weight"] for s in manifest["sources"]] == [0.25, 0.75]
    # the first 32 columns are the teacher's own unit vectors scaled by sqrt(0.25)
    own = task.encode(task.teacher, task._texts)
    assert torch.allclose(target[:, :32], 0.5 * own / own.norm(dim=1, keepdim=True), atol=1e-5)
    head = distiller.objectives[0].fn.projection
    assert head is not None and tuple(head.weight.shape) == (80, 32)
    losses = [json.loads(line)["loss"] for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses and losses[-1] < losses[0]
    student = next(row for row in summary["table"] if row["model"] == "student (after)")
    assert 0 < student["cosine_to_teacher"] < 1  # against teacher.path, the init's teacher


@pytest.mark.parametrize("changes, message", [
    ({"objectives": [{"name": "embedding_cosine"}]}, "objectives.0.name: with teacher.sources"),
    ({"student__init": "static", "student__layers": None}, "static student"),
])
def test_recipe_mistakes_are_one_line(zoo, tmp_path, changes, message):
    raw = _raw(zoo, "bad")
    for key, value in changes.items():
        if "__" in key:
            section, field = key.split("__")
            raw[section][field] = value
        else:
            raw[key] = value
    raw["student"] = {k: v for k, v in raw["student"].items() if v is not None}
    with pytest.raises(UserError, match=message) as err:
        load_recipe(write_yaml(tmp_path / "r.yaml", raw))
    assert "\n" not in str(err.value)


def test_sources_need_a_teacher_path(zoo, tmp_path):
    raw = _raw(zoo, "factory")
    raw["teacher"] = {"factory": "potstill.examples.digits:teacher", "sources": raw["teacher"]["sources"]}
    with pytest.raises(UserError, match="teacher.sources needs teacher.path"):
        load_recipe(write_yaml(tmp_path / "r.yaml", raw))


def test_teacher_choice_writes_a_weighted_recipe_that_loads(zoo, tmp_path):
    from potstill.search.teacher_choice import TeacherChoiceSettings, choose_teacher

    root, teacher, wide, _ = zoo
    raw = _raw(zoo, "pick")
    del raw["teacher"]["sources"]
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(TEXTS * 2)))
    raw["eval"]["probe_train"] = str(probe)
    result = choose_teacher(TeacherChoiceSettings(write_yaml(tmp_path / "pick.yaml", raw), [str(teacher), str(wide)],
                                                  tmp_path / "out"))
    written = yaml.safe_load(open(result["weighted_recipe"]).read())
    assert written["teacher"]["path"] == result["nearest"]
    assert [s["path"] for s in written["teacher"]["sources"]] == [str(teacher), str(wide)]
    assert [s["weight"] for s in written["teacher"]["sources"]] == pytest.approx([r["weight"] for r in
                                                                                  result["teachers"]])
    assert load_recipe(result["weighted_recipe"]).teacher.sources[1].weight == pytest.approx(
        result["teachers"][1]["weight"])


def test_a_source_as_wide_as_the_student_starts_as_a_scaled_identity_head():
    """The teacher.path source (as wide as its layer-drop student) starts as sqrt(w)·I: the run starts by comparing
    the student's own vectors with that source; a source of another width keeps the default init."""
    from potstill.losses import embedding_mse
    from potstill.losses.intermediate import ModelShape, ProjectedLoss

    loss = ProjectedLoss(embedding_mse)
    loss.bind(ModelShape(layers=1, hidden=4, heads=1),
              ModelShape(layers=2, hidden=4, heads=1, output=10, output_blocks=((4, 0.5), (6, 0.7))))
    weight = loss.projection.weight.detach()
    assert tuple(weight.shape) == (10, 4)
    assert torch.equal(weight[:4], 0.5 * torch.eye(4))
    assert not torch.equal(weight[4:], torch.zeros(6, 4))
