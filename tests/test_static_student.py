"""The model2vec-style static-embedding student: data-free construction, export, and further distillation."""

from __future__ import annotations

import json

import pytest
import torch
from test_tasks import TOPICS
from transformers import AutoTokenizer, BertConfig, BertModel

from potstill.assets import minilm_path
from potstill.config import validate_recipe
from potstill.errors import UserError
from potstill.students.static import StaticStudent, pca, sif_weights, token_vectors
from potstill.tasks import build_task
from potstill.train import run_recipe

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64)).eval()
    folder = tmp_path_factory.mktemp("encoder")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


def test_sif_weights_and_pca():
    w = sif_weights(4, 1e-4)
    inv = torch.tensor([1 / 2, 1 / 3, 1 / 4, 1 / 5], dtype=torch.float64)
    torch.testing.assert_close(w.double(), 1e-4 / (1e-4 + inv / inv.sum()))
    assert (w[1:] > w[:-1]).all()  # rarer (later) tokens weigh more
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    full, centred = pca(x, None), x - x.mean(0)
    torch.testing.assert_close(full @ full.T, centred @ centred.T, rtol=1e-4, atol=1e-4)  # a rotation
    two = pca(x, 2)
    assert two.shape == (50, 2) and two.var(0)[0] >= two.var(0)[1]


def test_token_vectors_are_the_mean_of_close_token_open(encoder):
    _, model, tok = encoder
    vectors = token_vectors(model, tok, batch_size=4096)
    assert vectors.shape == (len(tok), 32)
    t = tok.convert_tokens_to_ids("goal")
    seq = torch.tensor([[tok.sep_token_id, t, tok.cls_token_id]])
    with torch.no_grad():
        want = model(input_ids=seq, attention_mask=torch.ones_like(seq)).last_hidden_state.mean(1)[0]
    torch.testing.assert_close(vectors[t], want, rtol=1e-4, atol=1e-5)


def _recipe(tmp_path, folder, data, **trainer):
    return validate_recipe({
        "name": trainer.pop("name", "static"), "output_dir": str(tmp_path / "runs"), "task": "embedding",
        "teacher": {"path": str(folder)}, "student": {"init": "static", "config": {"pca_dims": 16}},
        "data": {"train": str(data), "eval": str(data), "max_length": 16},
        "objectives": [{"name": "embedding_mse", "params": {"normalize": True}}],
        "trainer": {"batch_size": 8, "lr": 5e-2, "log_every": 1, "num_threads": 1, **trainer},
        "eval": {"throughput": False, "compare_before": True}})


def test_data_free_static_student_exports_to_sentence_transformers(tmp_path, encoder):
    from sentence_transformers import SentenceTransformer

    folder, _, _ = encoder
    texts = [t for texts in TOPICS.values() for t in texts]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts * 4))
    recipe = _recipe(tmp_path, folder, data, max_steps=0)
    summary = run_recipe(recipe)
    assert summary["steps"] == 0 and [r["model"] for r in summary["table"]][-1] == "student (after)"
    st = SentenceTransformer(str(recipe.run_dir / "student"), device="cpu")
    got = torch.tensor(st.encode(texts))
    task = build_task(recipe, run_dir=recipe.run_dir)
    task.setup()
    assert isinstance(task.student, StaticStudent) and task.student.dim == 16
    torch.testing.assert_close(got, task.encode(task.student, texts), rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)  # normalize: true


def test_static_student_trains_further_by_embedding_distillation(tmp_path, encoder):
    folder, _, _ = encoder
    texts = [f"{t} {i}" for i, t in enumerate(t for texts in TOPICS.values() for t in texts)]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts * 8))
    recipe = _recipe(tmp_path, folder, data, max_steps=20)
    run_recipe(recipe)
    steps = [json.loads(x) for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in steps if "loss" in x]
    assert losses[-1] < 0.7 * losses[0]
    with pytest.raises(UserError, match="static .* is for the embedding task"):
        validate_recipe({**recipe.model_dump(mode="json"), "task": "classification"})
    with pytest.raises(UserError, match="takes pca_dims, sif_coefficient and normalize"):
        validate_recipe({**recipe.model_dump(mode="json"), "student": {"init": "static", "config": {"dims": 8}}})
    bad = _recipe(tmp_path, folder, data, max_steps=1, name="bad")
    bad.student.config = {"sif_coefficient": 2.0}
    with pytest.raises(UserError, match="field student.config: sif_coefficient"):
        run_recipe(bad)
