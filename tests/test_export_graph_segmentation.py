"""`potstill export` of graph (VQGraph / GLNN MLP) and segmentation (LAD) students: the ONNX model answers as the
saved student does on inputs the check never saw, int8 reports its cost on the held-out items, refusals stay one
line; the pixel-logit quality numbers against hand values."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from potstill.config import validate_recipe
from potstill.errors import UserError
from potstill.train import run_recipe

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.usefixtures("one_thread")
needs_graph = pytest.mark.skipif(importlib.util.find_spec("graspologic") is None
                                 or importlib.util.find_spec("torch_geometric") is None,
                                 reason="graph extra not installed")


def graph_recipe(tmp_path, teacher_dir, dataset: str, batch_size: int) -> dict:
    return {"name": f"g-{dataset}", "output_dir": str(tmp_path / "runs"), "task": "graph", "seed": 0,
            "teacher": {"factory": "potstill.teachers.vqgraph:load_vqgraph_teacher",
                        "kwargs": {"folder": str(teacher_dir)}},
            "student": {"init": "factory", "factory": "potstill.students.graph_mlp:GraphMLP",
                        "kwargs": {"hidden_dim": 16}},
            "data": {"train": f"builtin:{dataset}"}, "objectives": [{"name": "forward_kl"}],
            "trainer": {"max_steps": 2, "batch_size": batch_size, "lr": 0.01, "schedule": "constant",
                        "num_threads": 1},
            "eval": {"throughput": False, "compare_before": False}}


@pytest.fixture(scope="module")
def connectome_run(tmp_path_factory):
    """A connectome teacher fitted for 5 epochs and a 2-step student: the finished run's folder."""
    from potstill.data.graphs import connectome_tensors, stratified_split
    from potstill.teachers.vqgraph import NODE_FRACTIONS, FitSettings, fit_node_teacher, save_vqgraph_teacher

    tmp_path = tmp_path_factory.mktemp("export-graph")
    settings = FitSettings.for_dataset("connectome", seed=0, epochs=5, hidden=16, codebook=8)
    data = connectome_tensors(settings.features)
    split = stratified_split(data.labels.numpy(), NODE_FRACTIONS, settings.seed)
    teacher, scores = fit_node_teacher(data, split, settings)
    save_vqgraph_teacher(teacher, tmp_path / "teacher", settings, split, scores)
    recipe = validate_recipe(graph_recipe(tmp_path, tmp_path / "teacher", "connectome", 64))
    run_recipe(recipe)
    return recipe.run_dir


@needs_graph
def test_node_student_exports_node_features_to_logits_and_int8_scores_held_out_nodes(connectome_run):
    from potstill.data.graphs import connectome_tensors
    from potstill.export import SAMPLE_RECORDS, export_run
    from potstill.students.save import load_factory_student
    from potstill.teachers.vqgraph import load_vqgraph_teacher

    result = export_run(connectome_run, int8=True)
    assert result["task"] == "graph" and result["inputs"] == ["x"] and result["output"] == "logits"
    assert result["check"]["max_abs_deviation"] < 1e-4 and result["check"]["argmax_agreement_with_pytorch"] == 1.0

    student = load_factory_student(connectome_run / "student").eval()
    x = connectome_tensors("projection").x
    session = ort.InferenceSession(str(connectome_run / "export" / "model.onnx"))
    got = session.run(None, {"x": x.numpy()})[0]  # all 209 nodes in one call: the check never ran this size
    with torch.no_grad():
        want = student(x)[1]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)

    # int8 accuracy on the held-out (validation, then test) nodes with their true labels, by hand
    split = load_vqgraph_teacher(str(connectome_run.parent.parent / "teacher")).settings["split"]
    held_out = torch.tensor(split["val"] + split["test"])[:SAMPLE_RECORDS]
    labels = connectome_tensors("projection").labels[held_out]
    q = result["int8"]
    assert q["accuracy_float32"] == pytest.approx(float((want[held_out].argmax(-1) == labels).float().mean()))
    assert 0.5 <= q["argmax_agreement_with_float32"] <= 1.0 and 0.0 <= q["accuracy_int8"] <= 1.0
    assert set(q["rows_per_s"]) == {"pytorch", "onnx_float32", "onnx_int8"}
    assert (connectome_run / "export" / "model.int8.onnx").is_file()


@needs_graph
def test_refusal_of_a_task_without_an_export_is_one_line(connectome_run, monkeypatch):
    from potstill.export import export_run
    from potstill.tasks.graph import GraphTask

    monkeypatch.setattr(GraphTask, "export_kind", None)
    with pytest.raises(UserError) as err:
        export_run(connectome_run)
    message = str(err.value)
    assert "\n" not in message and "graph and segmentation students; this run's task is graph" in message


@needs_graph
@pytest.mark.skipif(importlib.util.find_spec("grakel") is None, reason="MUTAG ships with grakel")
def test_graph_student_exports_node_features_and_graph_index_to_graph_logits(tmp_path):
    from potstill.assets_graph import mutag
    from potstill.data.graphs import stratified_split
    from potstill.export import export_run
    from potstill.students.save import load_factory_student
    from potstill.teachers.vqgraph import GRAPH_FRACTIONS, FitSettings, fit_graph_teacher, save_vqgraph_teacher

    graphs = mutag()
    settings = FitSettings.for_dataset("mutag", epochs=1, hidden=16, codebook=8)
    split = stratified_split(np.array([g.label for g in graphs]), GRAPH_FRACTIONS, 0)
    teacher, scores = fit_graph_teacher(graphs, split, settings, np.random.default_rng(0))
    save_vqgraph_teacher(teacher, tmp_path / "teacher", settings, split, scores)
    recipe = validate_recipe(graph_recipe(tmp_path, tmp_path / "teacher", "mutag", 32))
    run_recipe(recipe)

    result = export_run(recipe.run_dir)
    assert result["inputs"] == ["x", "graph_of"] and result["check"]["max_abs_deviation"] < 1e-4
    student = load_factory_student(recipe.run_dir / "student").eval()
    session = ort.InferenceSession(str(recipe.run_dir / "export" / "model.onnx"))
    torch.manual_seed(0)
    x = torch.nn.functional.one_hot(torch.randint(0, 7, (11,)), 7).float()
    graph_of = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2])  # three graphs of 3, 2 and 6 atoms
    got = session.run(None, {"x": x.numpy(), "graph_of": graph_of.numpy()})[0]
    with torch.no_grad():
        want = student(x, graph_of)[1]
        alone = student(x[3:5], torch.zeros(2, dtype=torch.long))[1]  # the second graph on its own
    assert got.shape == (3, 2)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    one = session.run(None, {"x": x[3:5].numpy(), "graph_of": np.zeros(2, dtype=np.int64)})[0]
    np.testing.assert_allclose(one, alone.numpy(), atol=1e-5)
    np.testing.assert_allclose(one[0], got[1], atol=1e-5)


def test_segmentation_student_exports_pixel_logits_and_int8_reports_miou(tmp_path):
    from potstill.eval.segmentation import mean_iou
    from potstill.export import export_run
    from potstill.students.save import load_factory_student
    from potstill.tasks import build_task
    from potstill.teachers.lad import main as build_teacher

    assert build_teacher(["--out", str(tmp_path / "teacher"), "--train", "16", "--epochs", "1", "--width", "2",
                          "--seed", "3"]) == 0
    raw = {"name": "seg", "task": "segmentation", "output_dir": str(tmp_path / "runs"), "seed": 0,
           "teacher": {"factory": "potstill.teachers.lad:load_lad_teacher",
                       "kwargs": {"folder": str(tmp_path / "teacher")}},
           "student": {"init": "factory", "factory": "potstill.teachers.lad:segmentation_net",
                       "kwargs": {"width": 3, "seed": 100}},
           "data": {"train": {"path": "builtin:shapes", "limit": 16}, "eval": {"path": "builtin:shapes", "limit": 12},
                    "shapes": {"size": 16, "max_radius": 5}},
           "objectives": [{"name": "forward_kl"}],
           "trainer": {"max_steps": 2, "batch_size": 8, "lr": 1e-2, "schedule": "constant", "hard_label_weight": 1.0,
                       "num_threads": 1},
           "eval": {"throughput": False, "compare_before": False, "batch_size": 5}}
    recipe = validate_recipe(raw)
    run_recipe(recipe)
    result = export_run(recipe.run_dir, int8=True)
    assert result["inputs"] == ["pixels"] and result["output"] == "pixel_logits" and result["check"]["records"] == 12
    assert result["check"]["max_abs_deviation"] < 1e-4 and result["check"]["pixel_agreement_with_pytorch"] == 1.0

    task = build_task(recipe, run_dir=tmp_path / "probe")
    task.setup()
    held_out = task.sets["eval"]
    student = load_factory_student(recipe.run_dir / "student").eval()
    session = ort.InferenceSession(str(recipe.run_dir / "export" / "model.onnx"))
    got = session.run(None, {"pixels": held_out.images[:7].numpy()})[0]
    with torch.no_grad():
        want = student(held_out.images)
    assert got.shape == (7, 3, 16, 16)
    np.testing.assert_allclose(got, want[:7].numpy(), atol=1e-5)

    q = result["int8"]  # scored on the held-out images (not the training ones), against their masks
    assert q["miou_float32"] == pytest.approx(mean_iou(want.argmax(1), held_out.masks, 3))
    assert 0.0 <= q["miou_int8"] <= 1.0 and 0.5 <= q["pixel_agreement_with_float32"] <= 1.0
    assert q["rows_per_s"]["onnx_int8"] > 0


def test_pixel_logit_quality_against_hand_values():
    from potstill.export_quality import batch_quality, summarise

    def logits_of(class_map: list[list[int]]) -> torch.Tensor:  # (1, 2, 2, 2): the given argmax map
        return torch.nn.functional.one_hot(torch.tensor([class_map]), 2).permute(0, 3, 1, 2).float()

    reference, other = logits_of([[0, 0], [1, 1]]), logits_of([[0, 1], [1, 1]])
    masks = torch.tensor([[[0, 0], [0, 1]]])
    parts = [batch_quality("pixel_logits", reference, other, {"masks": masks}),
             batch_quality("pixel_logits", reference, reference, {})]
    got = summarise("pixel_logits", parts)
    # between: 7 of 8 pixels agree; confusion (target = reference) [[3, 1], [0, 4]]: IoU 3/4, 4/5
    assert got["pixel_agreement_with_float32"] == pytest.approx(7 / 8)
    assert got["miou_with_float32"] == pytest.approx((3 / 4 + 4 / 5) / 2)
    # against the mask (first batch only): reference IoU 2/3, 1/2; other 1/3, 1/3
    assert got["miou_float32"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert got["miou_int8"] == pytest.approx(1 / 3) and got["pixel_accuracy_int8"] == pytest.approx(2 / 4)
