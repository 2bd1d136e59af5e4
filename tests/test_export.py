"""`potstill export`: ONNX students answer as the PyTorch ones do, int8 copies report their cost, clear refusals."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import DIGITS, POTSTILL, embedding_recipe, numbered_texts_jsonl, tiny_bert_encoder

from potstill.config import validate_recipe
from potstill.errors import UserError
from potstill.train import run_recipe

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_factory_classifier_exports_and_int8_reports_its_cost(tmp_path, digits_recipe):
    from potstill.data.loaders import builtin_records
    from potstill.export import SAMPLE_RECORDS, export_run
    from potstill.students.save import load_factory_student

    summary = run_recipe(validate_recipe(digits_recipe))
    run_dir = tmp_path / "runs" / digits_recipe["name"]
    result = export_run(run_dir, int8=True)

    assert result["output"] == "logits" and result["inputs"] == ["features"]
    assert result["check"]["max_abs_deviation"] < 1e-4
    # independent of the export code: the saved student, rebuilt from its folder, against ONNX Runtime
    student = load_factory_student(summary["student_dir"]).eval()
    x = torch.rand(5, 64)
    got = ort.InferenceSession(str(run_dir / "export" / "model.onnx")).run(None, {"features": x.numpy()})[0]
    np.testing.assert_allclose(got, student(x).detach().numpy(), atol=1e-5)
    q = result["int8"]
    assert (run_dir / "export" / "model.int8.onnx").is_file() and q["argmax_agreement_with_float32"] > 0.8
    records = builtin_records("digits", "test")[:SAMPLE_RECORDS]  # the run's data.eval, as many as export checks
    logits = student(torch.tensor([r["features"] for r in records], dtype=torch.float32))
    labels = torch.tensor([r["label"] for r in records])
    assert q["accuracy_float32"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    assert set(q["rows_per_s"]) == {"pytorch", "onnx_float32", "onnx_int8"}
    assert json.loads((run_dir / "export" / "export.json").read_text())["check"] == result["check"]


def test_embedding_student_exports_the_sentence_embedding(tmp_path):
    from sentence_transformers import SentenceTransformer

    from potstill.export import export_run

    teacher = tiny_bert_encoder(tmp_path / "teacher", 2)
    texts = [f"sentence number {i} about {w}" for i, w in enumerate(["cats", "dogs", "rain", "stars"] * 5)]
    train = numbered_texts_jsonl(tmp_path / "train.jsonl", texts)
    raw = embedding_recipe(tmp_path, teacher, train, name="emb", student={"init": "layers_from_teacher",
                           "layers": [0]}, objectives=[{"name": "embedding_mse"}], max_steps=2)
    summary = run_recipe(validate_recipe(raw))
    result = export_run(summary["student_dir"].rsplit("/", 1)[0])
    assert result["output"] == "embedding" and "tokenizer.json" in result["tokenizer_files"]

    export = tmp_path / "runs" / "emb" / "export"
    model = SentenceTransformer(summary["student_dir"], device="cpu")
    new = ["a text the export never saw", "short"]
    batch = model.tokenizer(new, padding=True, return_tensors="np")
    session = ort.InferenceSession(str(export / "model.onnx"))
    feed = {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()}
    np.testing.assert_allclose(session.run(None, feed)[0], model.encode(new), atol=1e-4)


def test_causal_lm_student_exports_next_token_logits(tmp_path):
    from test_causal_lm import llama, make_tokenizer, write_jsonl
    from transformers import AutoModelForCausalLM

    from potstill.export import export_run

    tok = make_tokenizer()
    llama(len(tok), layers=2, init=0.3).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"the cat sat on mat {i}"} for i in range(16)])
    r = validate_recipe({"name": "lm", "output_dir": str(tmp_path / "runs"), "task": "causal_lm",
                         "teacher": {"path": str(tmp_path / "teacher")},
                         "student": {"init": "layers_from_teacher", "layers": [0]},
                         "data": {"train": train, "max_length": 16}, "objectives": [{"name": "forward_kl"}],
                         "trainer": {"max_steps": 1, "batch_size": 4, "num_threads": 1},
                         "eval": {"throughput": False, "compare_before": False}})
    summary = run_recipe(r)
    result = export_run(r.run_dir, int8=True)
    assert result["output"] == "token_logits" and 0 <= result["int8"]["argmax_agreement_with_float32"] <= 1

    model = AutoModelForCausalLM.from_pretrained(summary["student_dir"]).eval()
    ids = torch.tensor([tok("the cat sat")["input_ids"]])
    session = ort.InferenceSession(str(r.run_dir / "export" / "model.onnx"))
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())})[0]
    np.testing.assert_allclose(got, model(ids).logits[..., :len(tok)].detach().numpy(), atol=1e-4)


def test_unsupported_task_and_missing_runtime_are_one_line_errors(tmp_path, digits_recipe, monkeypatch):
    from potstill import export

    raw = copy.deepcopy(DIGITS)
    raw["output_dir"] = str(tmp_path / "runs")
    run_recipe(validate_recipe(raw))
    run_dir = tmp_path / "runs" / raw["name"]
    monkeypatch.setattr(type(export._load_student(run_dir, export._saved_recipe(run_dir))[0]), "export_kind", None)
    with pytest.raises(UserError, match="supports classification, image_classification, embedding, causal_lm, graph"):
        export.export_run(run_dir)
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(UserError, match=r"pip install 'potstill\[export\]'"):
        export.export_run(run_dir)

    missing = subprocess.run([*POTSTILL, "export", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert missing.returncode == 2 and "not a finished potstill run" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_image_classifier_exports_on_its_evaluation_images(tmp_path):
    """An image student exports with `pixels` in [0, 1] as input; ONNX Runtime answers as the saved student does
    on the run's evaluation images (not its training images), and int8 reports its agreement and accuracy."""
    import numpy as np
    from test_image_classification import tiny_recipe

    from potstill.export import export_run
    from potstill.students.save import load_factory_student

    raw = tiny_recipe(tmp_path)
    run_recipe(validate_recipe(raw))
    run_dir = tmp_path / "runs" / "tiny"
    result = export_run(run_dir, int8=True)
    assert result["inputs"] == ["pixels"] and result["output"] == "logits"
    assert result["check"]["records"] == 16  # the 16 evaluation images, not the 40 training ones
    assert 0 <= result["int8"]["accuracy_int8"] <= 1 and result["int8"]["argmax_agreement_with_float32"] > 0.5
    session = ort.InferenceSession(str(run_dir / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    pixels = np.load(tmp_path / "eval.npz")["x"][:, None].astype(np.float32) / 255.0
    got = session.run(None, {"pixels": pixels})[0]
    want = load_factory_student(run_dir / "student")(torch.from_numpy(pixels)).detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
