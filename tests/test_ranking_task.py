"""The ranking task: cross-encoder / bi-encoder teachers and students, mined negatives, cached teacher scores."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

from potstill.assets import minilm_path
from potstill.config import validate_recipe
from potstill.errors import UserError
from potstill.tasks import build_task
from potstill.tasks.ranking import margin_mse_over_candidates
from potstill.train import run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [
    ("who won the cup final", "The team won the cup after extra time."),
    ("how many goals did the striker score", "The striker scored twice in the final."),
    ("why did shares fall", "Shares fell after the bank reported losses."),
    ("what did the company forecast", "The company raised its profit forecast."),
    ("what is the weather tomorrow", "Rain is expected across the north tomorrow."),
    ("who won the election", "The opposition won the election by a narrow margin."),
    ("when does the film open", "The film opens in cinemas next Friday."),
    ("what did the minister announce", "The minister announced new funding for schools."),
]


def _tiny(tmp_path, name: str, cross: bool, layers: int = 3, seed: int = 0):
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, num_labels=1, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # no dropout: a smooth descent on 8 records
    model = BertForSequenceClassification(config) if cross else BertModel(config)
    folder = tmp_path / name
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _data(tmp_path, negatives: bool = False):
    rows = []
    for i, (q, p) in enumerate(PAIRS):
        row = {"query": q, "positive": p}
        if negatives:
            row["negatives"] = [PAIRS[(i + 1) % len(PAIRS)][1], PAIRS[(i + 3) % len(PAIRS)][1]]
        rows.append(row)
    path = tmp_path / ("train_neg.jsonl" if negatives else "train.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp_path, teacher, data, *, student=None, objectives=None, ranking=None, **trainer):
    return validate_recipe({
        "name": "rank", "output_dir": str(tmp_path / "runs"), "task": "ranking",
        "teacher": {"path": str(teacher)},
        "student": student or {"init": "layers_from_teacher", "layers": [0, 2]},
        "data": {"train": str(data), "eval": str(data), "max_length": 24},
        "objectives": objectives if objectives is not None else [{"name": "margin_mse"}],
        "ranking": ranking or {"negatives": 3},
        "trainer": {"max_steps": 6, "batch_size": 4, "lr": 3e-3, "log_every": 1, **trainer},
        "eval": {"throughput": True, "compare_before": True, "batch_size": 16}})


def test_margin_mse_over_candidates_is_margin_mse_and_shift_invariant():
    from potstill.losses import margin_mse

    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    ref = margin_mse(s[:, 0], s[:, 1:], t[:, 0], t[:, 1:])
    assert torch.allclose(margin_mse_over_candidates(s, t), ref)
    assert torch.allclose(margin_mse_over_candidates(s + 3.0, t - 7.0), ref, atol=1e-5)
    assert margin_mse_over_candidates(t, t) == 0
    with pytest.raises(ValueError, match="1 \\+ N"):
        margin_mse_over_candidates(s[:, :1], t[:, :1])


def test_bi_encoder_teacher_mines_negatives_and_trains(tmp_path):
    teacher = _tiny(tmp_path, "bi", cross=False)
    recipe = _recipe(tmp_path, teacher, _data(tmp_path), batch_size=8, lr=1e-3, max_steps=10,  # full batch
                     student={"init": "from_config", "config": {"num_hidden_layers": 1}},
                     objectives=[{"name": "margin_mse"}, {"name": "listwise_kl", "weight": 0.5}])
    task = build_task(recipe, run_dir=recipe.run_dir)
    task.setup()
    assert task.teacher_type == "bi_encoder" and task.student_type == "bi_encoder"
    for rec in task.train_records:
        assert len(rec["negatives"]) == 3 and rec["positive"] not in rec["negatives"]
        assert set(rec["negatives"]) <= set(task.collection)
    # mined by the teacher: its own top-3 non-positive passages
    q = task.encode(task.teacher, [task.train_records[0]["query"]])
    p = task.encode(task.teacher, task.collection)
    order = [task.collection[j] for j in (q @ p.T)[0].argsort(descending=True).tolist()]
    assert task.train_records[0]["negatives"] == [x for x in order if x != task.train_records[0]["positive"]][:3]
    assert task.teacher_cache.shape == (len(PAIRS), 4)

    summary = run_recipe(recipe)
    rows = {row["model"]: row for row in summary["table"]}
    after = rows["student (after)"]
    for key in ("rerank_mrr@10", "teacher_kendall_tau", "mrr@10", "ndcg@10", "recall@10", "teacher_top10_overlap",
                "queries_per_s"):
        assert key in after, key
    assert rows["teacher"]["teacher_kendall_tau"] == pytest.approx(1.0)
    losses = [json.loads(x)["loss"] for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert losses[-1] < 0.5 * losses[0]
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(recipe.run_dir / "student"), device="cpu")
    assert st.encode(["who won"]).shape == (1, 32)


def test_cross_encoder_teacher_to_pretrained_bi_encoder(tmp_path):
    teacher = _tiny(tmp_path, "ce", cross=True)
    student = _tiny(tmp_path, "bi_student", cross=False, layers=1, seed=1)
    recipe = _recipe(tmp_path, teacher, _data(tmp_path, negatives=True),
                     student={"init": "pretrained", "path": str(student)}, ranking={"similarity": "cosine"})
    task = build_task(recipe, run_dir=recipe.run_dir)
    task.setup()
    assert task.teacher_type == "cross_encoder"
    # the cached teacher scores are the cross-encoder's logits of each (query, candidate) pair
    rec = task.train_records[2]
    enc = task.tokenizer([rec["query"]] * 3, [rec["positive"], *rec["negatives"]], padding=True,
                         return_tensors="pt", truncation=True, max_length=24)
    with torch.inference_mode():
        logits = task.teacher(**enc).logits[:, 0]
    assert torch.allclose(task.teacher_cache[2], logits, atol=1e-5)
    summary = run_recipe(recipe)
    after = {row["model"]: row for row in summary["table"]}["student (after)"]
    assert "mrr@10" in after and "teacher_top10_overlap" not in after  # no dense teacher ranking to compare


def test_cross_encoder_student_and_contrastive_labels(tmp_path):
    teacher = _tiny(tmp_path, "bi", cross=False)
    student = _tiny(tmp_path, "ce_student", cross=False, layers=1)
    recipe = _recipe(tmp_path, teacher, _data(tmp_path, negatives=True), objectives=[],
                     student={"init": "pretrained", "path": str(student)},
                     ranking={"student_type": "cross_encoder"}, hard_label_weight=1.0)
    summary = run_recipe(recipe)
    after = {row["model"]: row for row in summary["table"]}["student (after)"]
    assert "rerank_mrr@10" in after and "mrr@10" not in after
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(recipe.run_dir / "student"), device="cpu")
    assert len(ce.predict([("who won", "The team won.")]).reshape(-1)) == 1


def test_ranking_user_errors(tmp_path):
    teacher = _tiny(tmp_path, "bi", cross=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "a", "positive": "b", "negatives": ["c"]}) + "\n" +
                   json.dumps({"query": "d", "positive": "e", "negatives": ["f", "g"]}) + "\n")
    task = build_task(_recipe(tmp_path, teacher, bad), run_dir=tmp_path / "r")
    with pytest.raises(UserError, match="same number of negatives"):
        task.setup()
    ce = _tiny(tmp_path, "ce", cross=True)
    task = build_task(_recipe(tmp_path, ce, _data(tmp_path)), run_dir=tmp_path / "r2")  # layers_from a CE
    with pytest.raises(UserError, match="ranking.student_type is bi_encoder"):
        task.setup()
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in PAIRS[:3]))
    task = build_task(_recipe(tmp_path, teacher, few), run_dir=tmp_path / "r3")
    with pytest.raises(UserError, match="only 3 distinct"):
        task.setup()
    with pytest.raises(UserError, match="compares logits"):
        from potstill.train.run import build_objectives

        build_objectives(_recipe(tmp_path, teacher, few, objectives=[{"name": "forward_kl"}]))
