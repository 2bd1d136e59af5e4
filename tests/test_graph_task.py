"""The graph task (GNN → MLP on the connectome): recipe rules, the saved VQGraph teacher, a short run, its reload,
resume of a killed run, and VQGraph's code loss on the task's signals against a hand value."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from conftest import fit_until_crash

from potstill.config import validate_recipe
from potstill.errors import UserError
from potstill.signals import GraphSignal

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(importlib.util.find_spec("graspologic") is None
                       or importlib.util.find_spec("torch_geometric") is None,
                       reason="graph extra not installed"),
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A VQGraph teacher fitted for 40 epochs on the connectome's seed-1 split, saved as the CLI saves it."""
    from potstill.data.graphs import connectome_tensors, stratified_split
    from potstill.teachers.vqgraph import NODE_FRACTIONS, FitSettings, fit_node_teacher, save_vqgraph_teacher

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = FitSettings.for_dataset("connectome", seed=1, epochs=40)
        data = connectome_tensors(settings.features)
        split = stratified_split(data.labels.numpy(), NODE_FRACTIONS, settings.seed)
        teacher, scores = fit_node_teacher(data, split, settings)
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path_factory.mktemp("graph") / "teacher"
    save_vqgraph_teacher(teacher, folder, settings, split, scores)
    return folder


def graph_recipe(tmp_path, teacher_dir, **changes) -> dict:
    raw = {"name": "g", "output_dir": str(tmp_path / "runs"), "task": "graph", "seed": 0,
           "teacher": {"factory": "potstill.teachers.vqgraph:load_vqgraph_teacher",
                       "kwargs": {"folder": str(teacher_dir)}},
           "student": {"init": "factory", "factory": "potstill.students.graph_mlp:GraphMLP",
                       "kwargs": {"hidden_dim": 64}},
           "data": {"train": "builtin:connectome"},
           "objectives": [{"name": "forward_kl"}, {"name": "vqgraph_code_kl", "weight": 0.01}],
           "trainer": {"max_steps": 60, "batch_size": 209, "lr": 0.01, "weight_decay": 5e-4,
                       "schedule": "constant", "max_grad_norm": None},
           "eval": {"throughput": False}}
    for key, value in changes.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return raw


def test_recipe_mistakes_are_one_line_naming_the_field(tmp_path):
    base = graph_recipe(tmp_path, tmp_path / "teacher")
    cases = [
        ({"data": {"train": "builtin:cora"}}, "data.train.path", "reads builtin:connectome or builtin:mutag"),
        ({"data": {"train": "builtin:connectome", "eval": {"path": "builtin:connectome", "limit": 5}}},
         "data.eval", "limit: not read by the graph task"),
        ({"student": {"init": "from_config", "config": {"hidden_size": 8}}}, "student", "init factory"),
        ({"teacher": {"path": "some/folder"}}, "teacher", "teacher.factory"),
    ]
    for change, field, words in cases:
        with pytest.raises(UserError) as err:
            validate_recipe({**base, **change})
        message = str(err.value)
        assert field in message and words in message and "\n" not in message.strip(), message
    recipe = validate_recipe(base)
    assert recipe.data.eval == recipe.data.train  # transductive: the same graph is scored


def test_the_saved_teacher_loads_back_with_its_split(teacher_dir, tmp_path):
    from potstill.data.graphs import connectome_tensors
    from potstill.teachers.vqgraph import SETTINGS_FILE, load_vqgraph_teacher

    teacher = load_vqgraph_teacher(str(teacher_dir))
    spec = json.loads((teacher_dir / SETTINGS_FILE).read_text())
    assert teacher.settings == spec and spec["dataset"] == "connectome" and spec["seed"] == 1
    split = spec["split"]
    assert sorted(split["train"] + split["val"] + split["test"]) == list(range(209))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    data = connectome_tensors()
    with torch.inference_mode():
        logits = teacher(data.x, data.edge_index).logits
    test = torch.tensor(split["test"])
    assert float((logits[test].argmax(-1) == data.labels[test]).float().mean()) == pytest.approx(
        spec["test_accuracy"])
    with pytest.raises(UserError, match="field teacher.kwargs.folder: .* is not a VQGraph teacher folder"):
        load_vqgraph_teacher(str(tmp_path))


def test_the_teacher_command_saves_the_seeded_split(tmp_path, capsys):
    from potstill.data.graphs import connectome_tensors, stratified_split
    from potstill.teachers.vqgraph import NODE_FRACTIONS, load_vqgraph_teacher, main

    threads = torch.get_num_threads()
    try:
        assert main(["--out", str(tmp_path / "t"), "--seed", "3", "--epochs", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "VQGraph teacher on connectome saved" in capsys.readouterr().out
    settings = load_vqgraph_teacher(str(tmp_path / "t")).settings
    expected = stratified_split(connectome_tensors().labels.numpy(), NODE_FRACTIONS, 3)
    assert [settings["split"][k] for k in ("train", "val", "test")] == [part.tolist() for part in expected]
    assert (settings["seed"], settings["epochs"], settings["features"]) == (3, 2, "projection")
    assert not list(tmp_path.glob(".t.*"))  # the atomic write left no temporary folder


def test_the_code_loss_reads_the_task_signals_and_matches_a_hand_value(teacher_dir, tmp_path):
    from potstill.losses import OBJECTIVES
    from potstill.tasks import build_task

    # codebook {0, 2} in one dimension: r(0) = softmax(0, −4/τ), r(2) = softmax(−4/τ, 0), so
    # KL(r(0) ‖ r(2)) = (4/τ)·tanh(2/τ) and the loss is τ²·(4/τ)·tanh(2/τ) = 4τ·tanh(2/τ)
    code_kl = OBJECTIVES["vqgraph_code_kl"].fn
    book = torch.tensor([[0.0], [2.0]])
    teacher = GraphSignal(torch.zeros(1, 2), torch.tensor([[0.0]]), book)
    for tau in (1.0, 2.0):
        value = code_kl(GraphSignal(torch.zeros(1, 2), torch.tensor([[2.0]])), teacher, temperature=tau)
        assert float(value) == pytest.approx(4 * tau * math.tanh(2 / tau), rel=1e-5)
    assert float(code_kl(GraphSignal(torch.zeros(1, 2), torch.tensor([[0.0]])), teacher)) == pytest.approx(0.0)

    task = build_task(validate_recipe(graph_recipe(tmp_path, teacher_dir)), run_dir=tmp_path / "probe")
    task.setup()
    nodes = [5, 0, 77]
    batch = task.collate([task.train_records[i] for i in nodes], nodes)
    signal = task.teacher_signal(batch)
    with torch.inference_mode():
        out = task.teacher(task.items.x, task.items.edge_index)
    assert torch.allclose(signal.hidden, out.hidden[nodes]) and torch.allclose(signal.logits, out.logits[nodes])
    assert torch.equal(signal.codebook, task.teacher.codebook.codewords)
    train = set(task.teacher.settings["split"]["train"])
    assert batch["labels"].tolist() == [int(task.items.labels[n]) if n in train else -100 for n in nodes]


def test_a_short_run_beats_the_untrained_student_and_reloads(teacher_dir, tmp_path):
    from potstill.evaluate import evaluate_run
    from potstill.train import run_recipe

    summary = run_recipe(validate_recipe(graph_recipe(tmp_path, teacher_dir)))
    before, teacher_row, after = (summary["table"][i] for i in (1, 0, -1))
    assert after["accuracy"] > before["accuracy"] + 0.2 and after["accuracy"] >= 0.7, summary["table"]
    assert after["agreement"] >= 0.7 and teacher_row["agreement"] == 1.0
    run = tmp_path / "runs" / "g"
    spec = json.loads((run / "student" / "potstill_student.json").read_text())
    assert spec["kwargs"] == {"hidden_dim": 64, "in_dim": 16, "num_classes": 4, "graph_level": False}
    rows = evaluate_run(run)
    assert rows[-1]["accuracy"] == pytest.approx(after["accuracy"])


def test_a_student_narrower_than_the_codebook_is_refused_naming_the_field(teacher_dir, tmp_path):
    from potstill.tasks import build_task

    raw = graph_recipe(tmp_path, teacher_dir, student={"kwargs": {"hidden_dim": 8}})
    task = build_task(validate_recipe(raw), run_dir=tmp_path / "probe")
    with pytest.raises(UserError, match="field student.kwargs.hidden_dim: .* codebook of width 64; the student "
                                        "gives node vectors of width 8"):
        task.setup()


def test_a_killed_run_resumes_to_the_uninterrupted_weights(teacher_dir, tmp_path):
    from safetensors.torch import load_file

    from potstill.train import run_recipe

    steps = {"max_steps": 4, "save_every": 2, "batch_size": 64}
    straight = validate_recipe(graph_recipe(tmp_path, teacher_dir, name="straight", trainer=steps,
                                            eval={"compare_before": False}))
    run_recipe(straight)
    halted = validate_recipe(graph_recipe(tmp_path, teacher_dir, name="halted", trainer=steps,
                                          eval={"compare_before": False}))
    fit_until_crash(halted, 3)
    run_recipe(halted, resume=True)
    a = load_file(str(straight.run_dir / "student" / "model.safetensors"))
    b = load_file(str(halted.run_dir / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_node_objectives_on_graphs_average_within_each_graph_first():
    from potstill.tasks.graph import PerGraphMean

    def per_node(student, teacher, *, reduction="mean", scale=1.0):
        assert reduction == "none"
        return student * scale

    values, graph_of = torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 1])
    objective = PerGraphMean(per_node)
    assert objective.batch_fields == {"graph_of": "graph_of"}
    assert float(objective(values, None, graph_of=graph_of, reduction="sum")) == pytest.approx(2.0 + 5.0)
    assert float(objective(values, None, graph_of=graph_of, scale=2.0)) == pytest.approx((4.0 + 10.0) / 2)


@pytest.mark.skipif(importlib.util.find_spec("grakel") is None, reason="MUTAG ships with grakel")
def test_mutag_graphs_train_a_pooled_student(tmp_path):
    import numpy as np

    from potstill.assets_graph import mutag
    from potstill.data.graphs import stratified_split
    from potstill.tasks import build_task
    from potstill.teachers.vqgraph import GRAPH_FRACTIONS, FitSettings, fit_graph_teacher, save_vqgraph_teacher
    from potstill.train import run_recipe

    graphs = mutag()
    settings = FitSettings.for_dataset("mutag", epochs=3)
    split = stratified_split(np.array([g.label for g in graphs]), GRAPH_FRACTIONS, 0)
    teacher, scores = fit_graph_teacher(graphs, split, settings, np.random.default_rng(0))
    save_vqgraph_teacher(teacher, tmp_path / "teacher", settings, split, scores)

    raw = graph_recipe(tmp_path, tmp_path / "teacher", data={"train": "builtin:mutag"},
                       student={"kwargs": {"hidden_dim": 64, "dropout": 0.0}},
                       trainer={"max_steps": 30, "batch_size": 32})
    task = build_task(validate_recipe(raw), run_dir=tmp_path / "probe")
    task.setup()
    assert len(task.train_records) == len(split[0]) and task.student_kwargs["graph_level"] is True
    batch = task.collate([task.train_records[i] for i in (0, 1)], [0, 1])
    sizes = [len(graphs[int(split[0][i])].node_labels) for i in (0, 1)]
    assert batch["graph_of"].tolist() == [0] * sizes[0] + [1] * sizes[1]
    assert torch.equal(batch["x"].argmax(-1), torch.from_numpy(np.concatenate(
        [graphs[int(split[0][i])].node_labels for i in (0, 1)])))
    signal = task.teacher_signal(batch)
    assert signal.logits.shape == (2, 2) and signal.hidden.shape == (sum(sizes), 64)

    summary = run_recipe(validate_recipe(raw))
    before, after = summary["table"][1], summary["table"][-1]
    assert after["agreement"] > before["agreement"] and after["val_agreement"] >= 0.8, summary["table"]
