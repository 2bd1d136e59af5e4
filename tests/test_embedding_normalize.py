"""An embedding student keeps its teacher's Normalize module (issue #18, trap 7): unit vectors like the teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest

from potstill.students.save import normalizes_embeddings


def test_normalizes_embeddings_reads_modules_json(tmp_path):
    from potstill.assets import minilm_path

    assert normalizes_embeddings(minilm_path()) is True  # all-MiniLM-L6-v2: Transformer, Pooling, Normalize
    (tmp_path / "modules.json").write_text(json.dumps([{"idx": 0, "type": "sentence_transformers.models.Pooling"}]))
    assert normalizes_embeddings(tmp_path) is False
    assert normalizes_embeddings(tmp_path / "missing") is False and normalizes_embeddings(None) is False


@pytest.mark.parametrize("teacher_normalizes", [True, False])
def test_student_mirrors_the_teachers_normalize(tmp_path, teacher_normalizes):
    from conftest import embedding_recipe, numbered_texts_jsonl, tiny_bert_encoder
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from potstill.config import validate_recipe
    from potstill.students import save_sentence_transformer
    from potstill.train import run_recipe

    bare = tiny_bert_encoder(tmp_path / "bare", num_hidden_layers=2)
    teacher = save_sentence_transformer(AutoModel.from_pretrained(bare), AutoTokenizer.from_pretrained(bare),
                                        tmp_path / "teacher", normalize=teacher_normalizes)
    data = numbered_texts_jsonl(tmp_path / "texts.jsonl", ["a short text", "another sentence here"] * 8)
    recipe = validate_recipe(embedding_recipe(
        tmp_path, teacher, data, name="norm", student={"init": "layers_from_teacher", "layers": [0]},
        objectives=[{"name": "embedding_mse", "params": {"normalize": True}}], max_steps=1))
    student_dir = run_recipe(recipe)["student_dir"]

    assert normalizes_embeddings(student_dir) is teacher_normalizes
    norms = np.linalg.norm(SentenceTransformer(student_dir).encode(["a short text", "hello world"]), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5) is teacher_normalizes
