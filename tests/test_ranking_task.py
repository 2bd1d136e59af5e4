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
from potstill.tasks.ranking_objectives import margin_mse_over_candidates
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


def _recipe(tmp_path, teacher, data, *, student=None, objectives=None, ranking=None, throughput=False, **trainer):
    """A small ranking recipe; `throughput` adds the interleaved speed measurement (seconds per run), which only
    the tests that read queries_per_s need."""
    return validate_recipe({
        "name": "rank", "output_dir": str(tmp_path / "runs"), "task": "ranking",
        "teacher": {"path": str(teacher)},
        "student": student or {"init": "layers_from_teacher", "layers": [0, 2]},
        "data": {"train": str(data), "eval": str(data), "max_length": 24},
        "objectives": objectives if objectives is not None else [{"name": "margin_mse"}],
        "ranking": ranking or {"negatives": 3},
        "trainer": {"max_steps": 6, "batch_size": 4, "lr": 3e-3, "log_every": 1, **trainer},
        "eval": {"throughput": throughput, "compare_before": True, "batch_size": 16}})


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
                     student={"init": "from_config", "config": {"num_hidden_layers": 1}}, throughput=True,
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


def test_in_batch_scores_of_student_and_both_teacher_kinds(tmp_path):
    data = _data(tmp_path, negatives=True)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    rows[5]["positive"] = rows[1]["positive"]  # two queries share an answer: their in-batch pair is masked
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for cross in (False, True):
        teacher = _tiny(tmp_path, f"t{cross}", cross=cross)
        student = _tiny(tmp_path, "s", cross=False, layers=1, seed=1)
        recipe = _recipe(tmp_path, teacher, data, student={"init": "pretrained", "path": str(student)},
                         objectives=[{"name": "margin_mse"}, {"name": "in_batch_margin_mse", "weight": 0.75}])
        task = build_task(recipe, run_dir=tmp_path / f"r{cross}")
        task.setup()
        idx = [0, 1, 5, 2]
        batch = task.collate([task.train_records[i] for i in idx], idx)
        expected_mask = torch.ones(4, 4, dtype=torch.bool)
        expected_mask[1, 2] = expected_mask[2, 1] = expected_mask[1, 1] = expected_mask[2, 2] = False
        expected_mask[0, 0] = expected_mask[3, 3] = False
        assert torch.equal(batch["in_batch_mask"], expected_mask)
        t = task.teacher_signal(batch)
        queries, positives = [rows[i]["query"] for i in idx], [rows[i]["positive"] for i in idx]
        with torch.inference_mode():
            if cross:
                enc = task.tokenizer([q for q in queries for _ in positives], positives * 4, padding=True,
                                     truncation=True, max_length=24, return_tensors="pt")
                want = task.teacher(**enc).logits.reshape(4, 4)
            else:
                want = task.encode(task.teacher, queries, side="query") @ task.encode(task.teacher, positives).T
        assert torch.allclose(t.in_batch, want, atol=1e-4)
        assert torch.allclose(t.candidates, task.teacher_cache[idx])
        s = task.student_signal(task.student, batch)
        q = task.encode(task.student, queries, side="query")
        assert torch.allclose(s.in_batch.detach(), q @ task.encode(task.student, positives).T, atol=1e-4)
        assert torch.allclose(s.in_batch.detach().diagonal(), s.candidates.detach()[:, 0], atol=1e-5)
    summary = run_recipe(recipe)  # cross-encoder teacher, live in-batch teacher scores
    assert summary["objectives"] == ["margin_mse", "in_batch_margin_mse"]


def test_in_batch_negatives_hard_label_is_cross_entropy_over_candidates_and_other_positives():
    from potstill.signals import RankingScores
    from potstill.tasks.ranking import RankingTask

    torch.manual_seed(0)
    task = RankingTask.__new__(RankingTask)
    task.student_type = "bi_encoder"
    task.recipe = validate_recipe({"task": "ranking", "teacher": {"path": "x"},
                                   "student": {"init": "pretrained", "path": "x"}, "data": {"train": "x"},
                                   "trainer": {"hard_label_weight": 1}, "ranking": {"in_batch_negatives": True}})
    cand, in_batch = torch.randn(3, 2), torch.randn(3, 3)
    in_batch.diagonal().copy_(cand[:, 0])
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[0, 2] = False  # query 0's positive is also item 2's
    loss = task.hard_label_loss(RankingScores(cand, in_batch, mask), {})
    want = 0.0
    for i in range(3):
        others = [in_batch[i, j] for j in range(3) if j != i and mask[i, j]]
        logits = torch.stack([*cand[i], *others])
        want += -torch.log_softmax(logits, 0)[0]
    assert torch.allclose(loss, want, atol=1e-5)


def test_tas_balanced_batches_share_a_cluster_and_resume_replays_them(tmp_path):
    teacher = _tiny(tmp_path, "bi", cross=False)
    recipe = _recipe(tmp_path, teacher, _data(tmp_path), batch_size=4, max_steps=6,
                     student={"init": "from_config", "config": {"num_hidden_layers": 1}},
                     ranking={"negatives": 3, "sampler": "tas_balanced", "tas_clusters": 2},
                     objectives=[{"name": "margin_mse"}, {"name": "in_batch_margin_mse", "weight": 0.75}])
    task = build_task(recipe, run_dir=recipe.run_dir)
    task.setup()
    assert len(task.train_records) == len(PAIRS) * 3 and all(len(r["negatives"]) == 1 for r in task.train_records)
    # pair record (q, j) carries the teacher's scores of q's positive and its j-th negative
    assert torch.equal(task.teacher_cache[3 * 2 + 1], task.query_scores[2, [0, 2]])
    order = task.epoch_order(0, 4)
    assert order == task.epoch_order(0, 4) and order != task.epoch_order(1, 4)
    assert len(order) % 4 == 0
    clusters = task.clusters.tolist()
    for start in range(0, len(order), 4):
        queries = [task._query_of[i] for i in order[start:start + 4]]
        assert len({clusters[q] for q in queries}) == 1
    full = [task._query_of[i] for i in order]
    assert set(full) == set(range(len(PAIRS)))  # every query once per epoch (short clusters filled)
    # the loop visits exactly this order, and a killed run resumes where it stopped
    from potstill.train.distiller import Distiller
    from potstill.train.run import build_objectives

    d = Distiller(task, build_objectives(recipe, task), recipe.trainer, run_dir=recipe.run_dir, seed=0)
    d._epoch_rows = len(order)
    assert [i for mb in range(len(order) // 4) for i in d._micro_batch_indices(mb)] == order
    summary = run_recipe(recipe)
    assert summary["steps"] == 6
    assert (recipe.run_dir / "tas_clusters" / "manifest.json").exists()


def test_separate_towers_save_a_router_with_query_and_document_routes(tmp_path):
    teacher = _tiny(tmp_path, "bi", cross=False)
    recipe = _recipe(tmp_path, teacher, _data(tmp_path), max_steps=4,
                     ranking={"negatives": 3, "towers": "separate", "in_batch_negatives": True},
                     objectives=[{"name": "margin_mse"}], hard_label_weight=0.5)
    summary = run_recipe(recipe)
    assert "mrr@10" in {row["model"]: row for row in summary["table"]}["student (after)"]
    from sentence_transformers import SentenceTransformer

    from potstill.students.ranking import DualEncoder

    task = build_task(recipe, run_dir=tmp_path / "check")
    task.setup()
    assert isinstance(task.student, DualEncoder)
    st = SentenceTransformer(str(recipe.run_dir / "student"), device="cpu")
    q, d = st.encode_query(["who won the cup"]), st.encode_document(["who won the cup"])
    assert q.shape == d.shape == (1, 32) and not torch.allclose(torch.tensor(q), torch.tensor(d))
    from safetensors.torch import load_file

    state = load_file(str(recipe.run_dir / "checkpoints" / "step-00000004" / "student.safetensors"))
    assert any(k.startswith("query.") for k in state) and any(k.startswith("passage.") for k in state)


def test_in_batch_needs_a_bi_encoder_student(tmp_path):
    teacher = _tiny(tmp_path, "bi", cross=False)
    student = _tiny(tmp_path, "s", cross=False, layers=1)
    recipe = _recipe(tmp_path, teacher, _data(tmp_path, negatives=True),
                     student={"init": "pretrained", "path": str(student)},
                     ranking={"student_type": "cross_encoder", "in_batch_negatives": True})
    with pytest.raises(UserError, match="need\\(s\\) a bi-encoder student"):
        build_task(recipe, run_dir=tmp_path / "r").setup()


def test_splade_student_with_flops_saves_a_sparse_encoder(tmp_path):
    teacher = _tiny(tmp_path, "bi", cross=False)
    recipe = _recipe(tmp_path, teacher, _data(tmp_path), max_steps=4,
                     ranking={"negatives": 3, "student_type": "splade"},
                     objectives=[{"name": "margin_mse"},
                                 {"name": "sparse_flops", "weight": 1e-3, "params": {"side": "both",
                                                                                       "warmup_steps": 2}}])
    summary = run_recipe(recipe)
    after = {row["model"]: row for row in summary["table"]}["student (after)"]
    assert after["passage_active_terms"] > 0 and "mrr@10" in after
    lines = [json.loads(x) for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    factors = [x["state/sparse_flops.lambda_factor"] for x in lines if "state/sparse_flops.lambda_factor" in x]
    assert factors == [0.25, 1.0, 1.0, 1.0]  # λ warm-up min(1, step/2)²
    from sentence_transformers import SparseEncoder

    from potstill.students.splade import SpladeEncoder

    task = build_task(recipe, run_dir=tmp_path / "check")
    task.setup()
    assert isinstance(task.student, SpladeEncoder)
    sparse = SparseEncoder(str(recipe.run_dir / "student"), device="cpu")
    from safetensors.torch import load_file

    task.student.load_state_dict(load_file(str(recipe.run_dir / "checkpoints" / "step-00000004" /
                                               "student.safetensors")))
    texts = [PAIRS[0][1], PAIRS[3][1]]
    want = task.encode(task.student, texts)
    got = sparse.encode_document(texts, convert_to_tensor=True).to_dense()
    assert torch.allclose(got, want, atol=1e-4)


def test_inference_free_splade_queries_are_collection_idf(tmp_path):
    teacher = _tiny(tmp_path, "bi", cross=False)
    recipe = _recipe(tmp_path, teacher, _data(tmp_path), max_steps=2,
                     ranking={"negatives": 3, "student_type": "splade", "inference_free": True},
                     objectives=[{"name": "margin_mse"}, {"name": "sparse_flops", "weight": 1e-3}])
    task = build_task(recipe, run_dir=recipe.run_dir)
    task.setup()
    from potstill.students.splade_inference_free import idf_from_collection

    idf = idf_from_collection(task.tokenizer, task.collection, vocab_size=task.tokenizer.vocab_size)
    assert torch.allclose(task.student.query.idf, idf)
    q = task.encode(task.student, ["who won the cup"], side="query")[0]
    ids = set(task.tokenizer("who won the cup", add_special_tokens=False)["input_ids"])
    assert set(q.nonzero().flatten().tolist()) == {i for i in ids if idf[i] > 0}
    batch = task.collate(task.train_records[:4], [0, 1, 2, 3])
    scores = task.student_signal(task.student, batch)
    assert scores.query_terms is None and scores.passage_terms.shape == (16, task.tokenizer.vocab_size)
    summary = run_recipe(recipe)
    rows = {row["model"]: row for row in summary["table"]}
    assert rows["student (after)"]["query_active_terms"] <= 8
    from sentence_transformers import SparseEncoder

    sparse = SparseEncoder(str(recipe.run_dir / "student"), device="cpu")
    got = sparse.encode_query(["who won the cup"], convert_to_tensor=True).to_dense()[0]
    assert torch.allclose(got, q, atol=1e-5)


def test_score_file_teacher_without_a_teacher_model(tmp_path):
    from potstill.teachers.score_file import ScoreFile

    data = _data(tmp_path, negatives=True)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    scores = tmp_path / "teacher_scores.jsonl"
    lines = []
    for i, row in enumerate(rows):
        for j, passage in enumerate([row["positive"], *row["negatives"]]):
            lines.append({"query": row["query"], "passage": passage, "score": 10.0 - j + 0.1 * i})
    scores.write_text("".join(json.dumps(x) + "\n" for x in lines))
    student = _tiny(tmp_path, "s", cross=False, layers=1)
    raw = {"name": "rank", "output_dir": str(tmp_path / "runs"), "task": "ranking", "teacher": {},
           "student": {"init": "pretrained", "path": str(student)},
           "data": {"train": str(data), "eval": str(data), "max_length": 24},
           "objectives": [{"name": "margin_mse"}], "ranking": {"teacher_scores": str(scores)},
           "trainer": {"max_steps": 3, "batch_size": 4}, "eval": {"batch_size": 16}}
    recipe = validate_recipe(raw)
    task = build_task(recipe, run_dir=recipe.run_dir)
    task.setup()
    assert task.teacher is None and task.teacher_type == "scores"
    assert torch.allclose(task.teacher_cache[2], torch.tensor([10.2, 9.2, 8.2]))
    summary = run_recipe(recipe)
    table = {row["model"]: row for row in summary["table"]}
    assert table["teacher"]["rerank_mrr@10"] == 1.0 and "queries_per_s" not in table["teacher"]
    assert "teacher_kendall_tau" in table["student (after)"] and "queries_per_s" in table["student (after)"]
    # a layers_from_teacher student needs the teacher model; in-batch teacher scores too
    for change, match in (({"student": {"init": "layers_from_teacher", "layers": [0]}}, "builds the student"),
                          ({"objectives": [{"name": "in_batch_margin_mse"}]}, "need a teacher model")):
        with pytest.raises(UserError, match=match):
            build_task(validate_recipe({**raw, **change}), run_dir=tmp_path / "x").setup()
    # two score files: a heterogeneous ensemble, each min–max normalised per query, then scale × the mean
    other = tmp_path / "other_scores.jsonl"
    other.write_text("".join(json.dumps({**x, "score": 3.0 * (x["score"] % 1.0) - 2.0}) + "\n" for x in lines))
    both = validate_recipe({**raw, "ranking": {"teacher_scores": [str(scores), str(other)], "ensemble_scale": 30}})
    task = build_task(both, run_dir=tmp_path / "ens")
    task.setup()
    from potstill.teachers.ensemble import minmax_ensemble

    first, second = (ScoreFile.load(f).scores_for_records(task.queries) for f in (scores, other))
    assert torch.allclose(task.teacher_cache, minmax_ensemble([first, second], scale=30.0))
    scores.write_text("".join(json.dumps(x) + "\n" for x in lines[:-1]))  # one pair missing
    with pytest.raises(UserError, match="1 of 24 \\(query, passage\\) pairs"):
        build_task(recipe, run_dir=tmp_path / "y").setup()


def test_sparse_flops_warm_up_state_and_errors():
    from potstill.losses import flops
    from potstill.losses.ranking import SparseFlops
    from potstill.signals import RankingScores
    from potstill.tasks.ranking_objectives import RankingSparseFlops

    torch.manual_seed(0)
    terms = torch.rand(6, 10)
    reg = SparseFlops(warmup_steps=4)
    assert reg(terms, queries=3) == 0  # step 0
    reg.on_optimizer_step(loss=0.0, step=2, total_steps=10)
    assert torch.allclose(reg(terms, queries=3), 0.25 * flops(terms))
    assert torch.allclose(reg(terms, queries=3, reduction="sum"), 3 * 0.25 * flops(terms))
    restored = SparseFlops(warmup_steps=4)
    restored.load_state_dict(reg.state_dict())
    assert restored.factor == 0.25
    with pytest.raises(ValueError, match="query term weights"):
        SparseFlops(side="query")(terms, queries=3)
    with pytest.raises(ValueError, match="side"):
        SparseFlops(side="docs")
    # the ranking task hands it the term weights of the student's signal, B = the signal's queries
    signal = RankingScores(torch.zeros(3, 2), passage_terms=terms)
    on_signal = RankingSparseFlops(warmup_steps=4)
    on_signal.load_state_dict(reg.state_dict())
    assert torch.allclose(on_signal(signal), 0.25 * flops(terms))
    assert torch.allclose(on_signal(signal, reduction="sum"), 3 * 0.25 * flops(terms))
    with pytest.raises(ValueError, match="query term weights"):
        RankingSparseFlops(side="query")(signal)


def test_two_processes_train_the_ranking_student_like_one(tmp_path):
    """2 gloo processes × batch 4 (Margin-MSE, shared tower) end with the student of 1 process × batch 8; with
    separate towers, TAS-Balanced batches and in-batch teacher scores the 2-process run also completes."""
    import yaml
    from conftest import accelerate_launch
    from safetensors.torch import load_file

    teacher = _tiny(tmp_path, "bi", cross=False)
    base = _recipe(tmp_path, teacher, _data(tmp_path), batch_size=4, max_steps=3,
                   student={"init": "from_config", "config": {"num_hidden_layers": 1}}).model_dump(mode="json")
    base["eval"] = {"throughput": False, "compare_before": False, "batch_size": 16}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(dict(base, name="two")))
    proc = accelerate_launch(tmp_path, path, "--multi_gpu", port=29571)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = validate_recipe(dict(base, name="one", trainer={**base["trainer"], "batch_size": 8}))
    run_recipe(one)
    a = load_file(str(tmp_path / "runs" / "two" / "checkpoints" / "step-00000003" / "student.safetensors"))
    b = load_file(str(one.run_dir / "checkpoints" / "step-00000003" / "student.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    tas = dict(base, name="tas", ranking={"negatives": 3, "sampler": "tas_balanced", "tas_clusters": 1,
                                          "towers": "separate"},
               objectives=[{"name": "margin_mse"}, {"name": "in_batch_margin_mse", "weight": 0.75}])
    path.write_text(yaml.safe_dump(tas))
    proc = accelerate_launch(tmp_path, path, "--multi_gpu", port=29572)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "tas" / "student" / "modules.json").exists()


def test_collection_file_and_query_level_relevance(tmp_path):
    rows = [{"query": q, "positive": p} for q, p in PAIRS]
    rows.append({"query": PAIRS[0][0], "positive": "They lifted the cup in the final minute."})  # 2nd answer
    data = tmp_path / "qrels.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = tmp_path / "collection.jsonl"
    distractors = ["The museum opens at nine.", "Bread needs flour and water."]
    extra.write_text("".join(json.dumps({"passage": x}) + "\n" for x in distractors))
    teacher = _tiny(tmp_path, "bi", cross=False)
    raw = _recipe(tmp_path, teacher, data, ranking={"negatives": 3, "relevance": "query"},
                  objectives=[{"name": "margin_mse"}, {"name": "in_batch_margin_mse"}]).model_dump(mode="json")
    raw["data"]["collection"] = {"path": str(extra)}
    task = build_task(validate_recipe(raw), run_dir=tmp_path / "r")
    task.setup()
    assert set(distractors) <= set(task.collection) and len(task.collection) == len(PAIRS) + 3
    both = {PAIRS[0][1], rows[-1]["positive"]}
    for i in (0, len(PAIRS)):  # neither answer of the shared question is mined as a negative of it
        assert not both & set(task.train_records[i]["negatives"])
    batch = task.collate([task.train_records[i] for i in (0, 1, len(PAIRS))], [0, 1, len(PAIRS)])
    assert not batch["in_batch_mask"][0, 2] and not batch["in_batch_mask"][2, 0] and batch["in_batch_mask"][0, 1]
    # either answer counts as a hit in the collection metrics: the teacher's MRR with query-level relevance
    # is at least its record-level one
    by_query = task.evaluate(task.teacher, role="teacher")["mrr@10"]
    raw["ranking"]["relevance"] = "record"
    record = build_task(validate_recipe(raw), run_dir=tmp_path / "r2")
    record.setup()
    assert by_query >= record.evaluate(record.teacher, role="teacher")["mrr@10"]
    bad = tmp_path / "bad_collection.jsonl"
    bad.write_text(json.dumps({"passage": 3}) + "\n")
    raw["data"]["collection"] = {"path": str(bad)}
    with pytest.raises(UserError, match="data.collection: record 1"):
        build_task(validate_recipe(raw), run_dir=tmp_path / "r3").setup()


def test_pretrained_cross_encoder_student_takes_the_recipe_dropout(tmp_path):
    from potstill.config import StudentConfig
    from potstill.students.ranking import build_ranking_student

    folder = _tiny(tmp_path, "ce", cross=True, layers=1)  # saved with dropout 0
    cfg = StudentConfig(init="pretrained", path=str(folder), dropout=0.3)
    student = build_ranking_student(cfg, None, student_type="cross_encoder", teacher=None,
                                    teacher_type="cross_encoder", tokenizer=None, seed=0)
    assert {m.p for m in student.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}
    assert student.config.hidden_dropout_prob == 0.3 and student.training
