"""`potstill search` with `proxy: supernet`: the space's checks, the supernet trained once per study and reused,
a trial's score against the held-out loss computed directly, and the Pareto recipes of extracted students."""

from __future__ import annotations

import json
import statistics
from types import SimpleNamespace

import pytest

from potstill.errors import UserError
from potstill.search.space import parse_space

pytest.importorskip("optuna")

SUPERNET = {"steps": 3, "batch_size": 4, "max_length": 16, "lr": 1.0e-3}


@pytest.mark.parametrize(("raw", "message"), [
    ({"student": {"init": ["pruned"], "depth": [1]}}, "init is \\[supernet\\] \\(or left out\\)"),
    ({"student": {"layers": [[0, 2]], "init": ["supernet"]}}, "give depth instead of layer choices"),
    ({"student": {"width": [16], "heads": [1]}}, "heads follow its width"),
    ({"student": {"init": ["supernet", "pruned"], "depth": [1]}}, "the only init of proxy supernet"),
    ({"student": {"init": ["supernet"]}}, "needs at least one of depth, width, ffn"),
    ({"lr": [1e-4], "quality": {"metric": "cosine_to_teacher"}}, "lr, quality: proxy supernet searches"),
    ({"supernet": {"steps": 0}}, "field supernet.steps: Input should be greater than or equal to 1"),
    ({"supernet": {"heldout": {"split": "x"}}}, "field supernet.heldout.path: Field required"),
    ({"proxy": "train", "student": {"init": ["supernet"], "depth": [1]}}, "it needs proxy: supernet"),
    ({"proxy": "train", "supernet": {}, "student": {"init": ["pruned"], "depth": [1]}},
     "set proxy: supernet or remove them"),
])
def test_supernet_space_mistakes_are_one_line_naming_the_field(raw, message):
    raw = {"proxy": "supernet", "student": {"depth": [1, 2]}, **raw}
    with pytest.raises(UserError, match=message) as err:
        parse_space(raw, "space.yaml")
    assert "\n" not in str(err.value) and "space.yaml" in str(err.value)


def test_a_supernet_space_defaults_to_the_measured_setting():
    space = parse_space({"proxy": "supernet", "student": {"depth": [1, 2], "ffn": [32]}})
    assert space.student.init == ["supernet"] and space.supernet is None
    assert space.quality_for("embedding").direction == "minimize"
    from potstill.search.space import SupernetSettings

    assert (SupernetSettings().steps, SupernetSettings().batch_size, SupernetSettings().max_length) == (240, 8, 32)


@pytest.fixture
def tiny(tmp_path):
    """A 3-layer, 32-wide BERT teacher (head size 16), an embedding recipe, and a supernet space of 4 subnets."""
    from conftest import tiny_search_recipe, write_yaml

    raw = tiny_search_recipe(tmp_path, max_steps=1)
    recipe = write_yaml(tmp_path / "recipe.yaml", raw)
    space = write_yaml(tmp_path / "space.yaml", {"proxy": "supernet", "supernet": SUPERNET,
                                                 "student": {"depth": [1, 3], "width": [16, 32], "ffn": [64]}})
    return tmp_path, recipe, space


@pytest.mark.parametrize(("student", "message"), [
    ({"depth": [4]}, "field student.depth: 4 is more than the teacher's 3 layers"),
    ({"width": [24]}, "field student.width: 24 must be a multiple of the teacher's head size 16"),
    ({"width": [48]}, "up to its width 32"),
    ({"ffn": [128]}, "field student.ffn: 128 is more than the teacher's FFN width 64"),
])
def test_candidates_outside_the_teacher_are_refused_naming_the_file(tiny, student, message):
    from potstill.config import load_recipe
    from potstill.search.study import check_space

    _, recipe, _ = tiny
    space = parse_space({"proxy": "supernet", "student": student})
    with pytest.raises(UserError, match=message) as err:
        check_space(space, load_recipe(recipe), "my-space.yaml")
    assert "search space my-space.yaml" in str(err.value)
    relation = parse_space({"proxy": "supernet", "student": {"width": [16]}, "supernet": {"relation_heads": 3}})
    with pytest.raises(UserError, match="not divisible by the 3 relation heads"):
        check_space(relation, load_recipe(recipe), "my-space.yaml")
    with pytest.raises(UserError, match="it needs an embedding recipe, not causal_lm"):
        check_space(space, SimpleNamespace(task="causal_lm", teacher=None), "my-space.yaml")


def _search(recipe, space, study, budget="10m"):
    from potstill.search.space import load_space
    from potstill.search.study import SearchSettings, parse_budget, run_search

    return run_search(SearchSettings(recipe, load_space(space), space, study, parse_budget(budget)))


def _fake_speed(monkeypatch):
    """Speed-up = teacher parameters / student parameters (the real measurement takes ≥ 14 s per architecture)."""
    from potstill.eval import count_parameters
    from potstill.tasks.embedding import EmbeddingTask

    def measure(self, student):
        return {"teacher": {"sentences_per_s": 1e6 / count_parameters(self.teacher)},
                "student": {"sentences_per_s": 1e6 / count_parameters(student)}}

    monkeypatch.setattr(EmbeddingTask, "measure", measure)


def _direct_heldout_loss(study, teacher_dir, label, batch_size, max_length):
    """A subnet's held-out relation loss from the stored supernet weights, computed without the proxy class."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from potstill.data.loaders import load_source
    from potstill.students.supernet import ElasticBert, ElasticSpace, Subnet, last_layer_qkv, subnet_relation_loss

    teacher, tok = AutoModel.from_pretrained(teacher_dir).eval(), AutoTokenizer.from_pretrained(teacher_dir)
    supernet = AutoModel.from_pretrained(teacher_dir)
    supernet.load_state_dict(load_file(str(study / "supernet" / "supernet.safetensors")))
    depth, hidden, ffn = label.split("-")
    subnet = Subnet(int(depth[:-1]), int(hidden[1:]), int(ffn[3:]))
    elastic = ElasticBert(supernet.eval(), ElasticSpace((subnet.layers,), (subnet.hidden,), (subnet.ffn,))).eval()
    texts = [r["text"] for r in load_source(str(study.parent / "eval.jsonl"))]
    losses = []
    for i in range(0, len(texts), batch_size):
        inputs = dict(tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt"))
        with torch.no_grad(), last_layer_qkv(teacher) as qkv:
            teacher(**inputs)
        with torch.no_grad():
            losses.append(float(subnet_relation_loss(elastic, subnet, inputs, [qkv["query"], qkv["key"],
                                                                                qkv["value"]], heads=2)))
    return statistics.fmean(losses), elastic, subnet


@pytest.mark.usefixtures("one_thread")
def test_the_supernet_is_trained_once_scores_slices_and_writes_runnable_recipes(tiny, monkeypatch):
    import torch
    from transformers import AutoModel

    from potstill.config import load_recipe
    from potstill.search.supernet_proxy import SupernetProxy

    tmp_path, recipe, space = tiny
    _fake_speed(monkeypatch)
    trainings = []
    original = SupernetProxy.train
    monkeypatch.setattr(SupernetProxy, "train", lambda self, elastic: trainings.append(1) or original(self, elastic))
    study = tmp_path / "study"
    result = _search(recipe, space, study)
    assert result["proxy"] == "supernet" and result["metric"] == "supernet_loss" and result["direction"] == "minimize"
    assert result["finished"] == 4 and len(result["trials"]) == 4  # every subnet once, then the search stops
    assert {t["label"] for t in result["trials"]} == {"supernet depth 1 width 16 ffn 64", "supernet depth 1 width 32 "
                                                      "ffn 64", "supernet depth 3 width 16 ffn 64",
                                                      "supernet depth 3 width 32 ffn 64"}
    assert trainings == [1] and result["supernet"]["trained_now"]
    weights = study / "supernet" / "supernet.safetensors"
    stamp = weights.stat().st_mtime_ns

    for trial in result["trials"]:  # the score is the slice's held-out loss, computed here without the proxy
        label = json.loads(trial["overrides"][1].split("=", 1)[1])["path"].rsplit("/", 1)[1]
        direct, elastic, subnet = _direct_heldout_loss(study, tmp_path / "teacher", label, 4, 16)
        assert trial["quality"] == pytest.approx(direct, rel=1e-5)
        assert trial["metrics"]["supernet_loss"] == trial["quality"]
    full = next(t for t in result["trials"] if t["values"] == {"init": "supernet", "depth": 3, "width": 32,
                                                                "ffn": 64})
    assert full["speedup"] == pytest.approx(1.0, rel=2e-3)  # the teacher's shape (the teacher adds its pooler)

    assert result["pareto"]
    for number in result["pareto"]:  # a Pareto recipe: the search recipe with the extracted student folder
        path = next(t for t in result["trials"] if t["number"] == number)["recipe"]
        loaded = load_recipe(path)
        assert loaded.student.init == "pretrained" and loaded.trainer.max_steps == 1
        student = AutoModel.from_pretrained(loaded.student.path)
        _, elastic, subnet = _direct_heldout_loss(study, tmp_path / "teacher", loaded.student.path.rsplit("/")[-1],
                                                  4, 16)
        assert (student.config.num_hidden_layers, student.config.hidden_size) == (subnet.layers, subnet.hidden)
        torch.testing.assert_close(student.encoder.layer[-1].intermediate.dense.weight,
                                   elastic.extract(subnet).encoder.layer[-1].intermediate.dense.weight)

    from potstill.train import run_recipe  # the smallest front point runs as a normal recipe

    smallest = min(result["pareto"], key=lambda n: result["trials"][n]["params"])
    summary = run_recipe(load_recipe(result["trials"][smallest]["recipe"]))
    assert summary["steps"] == 1

    again = _search(recipe, space, study)  # a rerun loads the supernet: no training, the same file, same scores
    assert trainings == [1] and not again["supernet"]["trained_now"] and weights.stat().st_mtime_ns == stamp
    assert [t["quality"] for t in again["trials"]] == [t["quality"] for t in result["trials"]]

    from conftest import write_yaml

    other = write_yaml(tmp_path / "other.yaml", {"proxy": "supernet", "supernet": {**SUPERNET, "steps": 4},
                                                 "student": {"depth": [1, 3], "width": [16, 32], "ffn": [64]}})
    with pytest.raises(UserError, match="trained with other settings"):
        _search(recipe, other, study)


def test_the_shipped_supernet_space_fits_the_demo_teacher():
    from potstill.config import load_recipe
    from potstill.recipes import packaged_recipe
    from potstill.search.space import load_space
    from potstill.search.study import check_space
    from potstill.search.supernet_proxy import all_values, elastic_space, teacher_config

    path = packaged_recipe("demo").parent / "spaces" / "minilm-supernet.yaml"
    space, recipe = load_space(path), load_recipe(packaged_recipe("demo"))
    check_space(space, recipe, str(path))  # every subnet fits all-MiniLM-L6-v2 (6 layers, 384 wide, FFN 1536)
    assert space.supernet is not None and space.supernet.steps == 240
    assert len(all_values(space, elastic_space(space, teacher_config(recipe)))) == 45


@pytest.mark.usefixtures("one_thread")
def test_a_search_killed_while_the_supernet_trains_continues_it(tiny, monkeypatch):
    """Killed in the supernet's 3rd step (partial saves every step), the rerun starts at step 2 and ends with the
    weights of an uninterrupted training, bit for bit; the partial file is gone once the supernet is whole."""
    import torch
    from safetensors.torch import load_file

    import potstill.students.supernet as supernet_module
    from potstill.search import supernet_proxy
    from potstill.search.space import load_space

    tmp_path, recipe, space = tiny
    supernet_proxy.SupernetProxy(recipe, [], load_space(space), tmp_path / "straight")
    monkeypatch.setattr(supernet_proxy, "SAVE_EVERY", 1)
    original, calls = supernet_module.sandwich_step, []

    def killed_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(supernet_module, "sandwich_step", killed_in_step_3)
    halted = tmp_path / "halted"
    with pytest.raises(KeyboardInterrupt):
        supernet_proxy.SupernetProxy(recipe, [], load_space(space), halted)
    partial = halted / "supernet" / "partial.pt"
    assert torch.load(partial, weights_only=False)["step"] == 2
    assert not (halted / "supernet" / "supernet.safetensors").exists()
    supernet_proxy.SupernetProxy(recipe, [], load_space(space), halted)
    assert len(calls) == 4  # steps 1, 2, the killed 3rd, then only the 3rd again
    a = load_file(str(tmp_path / "straight" / "supernet" / "supernet.safetensors"))
    b = load_file(str(halted / "supernet" / "supernet.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not partial.exists()


@pytest.mark.usefixtures("one_thread")
def test_a_budget_spent_while_the_supernet_trains_ends_the_search_and_the_rerun_continues(tiny, monkeypatch,
                                                                                        capsys):
    import torch
    from safetensors.torch import load_file

    from potstill.search import supernet_proxy
    from potstill.search.space import load_space

    tmp_path, recipe, space = tiny
    _fake_speed(monkeypatch)
    supernet_proxy.SupernetProxy(recipe, [], load_space(space), tmp_path / "straight")
    with monkeypatch.context() as clock:  # the budget is over as soon as the first supernet step ends
        clock.setattr(supernet_proxy, "time", SimpleNamespace(perf_counter=lambda: 1e12))
        study = tmp_path / "study"
        first = _search(recipe, space, study)
    assert first["finished"] == 0 and {t["state"] for t in first["trials"]} == {"waiting"}  # 4 queued subnets
    assert "supernet" not in first
    assert "the budget ran out while the supernet trained (step 1 of 3, saved); run the same command again" \
        in capsys.readouterr().err
    assert torch.load(study / "supernet" / "partial.pt", weights_only=False)["step"] == 1
    again = _search(recipe, space, study)
    assert again["finished"] == 4 and again["supernet"]["trained_now"]
    a = load_file(str(tmp_path / "straight" / "supernet" / "supernet.safetensors"))
    b = load_file(str(study / "supernet" / "supernet.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a) and not (study / "supernet" / "partial.pt").exists()
