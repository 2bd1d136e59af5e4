"""Structured pruning as a student init (MiniMA's prune-then-distil): dims, exactness, importance, recipes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from potstill.config import validate_recipe
from potstill.config.common import PRUNABLE_FIELDS as CONFIG_FIELDS
from potstill.errors import UserError
from potstill.students.pruning import (
    PRUNABLE_FIELDS,
    Importance,
    causal_lm_loss,
    embedding_contrastive_loss,
    mask_importance,
    plan_pruning,
    prune_from_teacher,
    record_text,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def bert(layers: int = 3) -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                num_hidden_layers=layers, max_position_embeddings=32)).eval()


def llama(layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=8, intermediate_size=48, num_hidden_layers=layers,
                                        tie_word_embeddings=True, initializer_range=0.2)).eval()


def batches(vocab: int, n: int = 2, rows: int = 6, length: int = 10) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (rows, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, length - 3:] = 0  # one padded row
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_field_lists_agree():
    assert CONFIG_FIELDS == PRUNABLE_FIELDS


def test_bert_hits_target_dims_and_runs():
    teacher = bert()
    data = batches(50)
    targets = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 24, "num_hidden_layers": 2}
    student = prune_from_teacher(teacher, targets, data, embedding_contrastive_loss)
    c = student.config
    assert (c.hidden_size, c.num_attention_heads, c.intermediate_size, c.num_hidden_layers) == (16, 2, 24, 2)
    layer = student.encoder.layer[0]
    assert layer.attention.self.query.weight.shape == (16, 16)
    assert layer.intermediate.dense.weight.shape == (24, 16)
    assert student.embeddings.word_embeddings.weight.shape == (50, 16)
    out = student(**data[0]).last_hidden_state
    assert out.shape == (6, 10, 16) and torch.isfinite(out).all()
    # the teacher is untouched
    assert teacher.config.hidden_size == 32 and teacher.encoder.layer[0].attention.self.query.weight.shape == (32, 32)


def test_keeping_everything_reproduces_the_teacher_exactly():
    for teacher, loss, vocab in ((bert(), embedding_contrastive_loss, 50), (llama(), causal_lm_loss, 60)):
        data = batches(vocab)
        student = prune_from_teacher(teacher, {}, data, loss).eval()
        with torch.no_grad():
            a, b = teacher(**data[0]), student(**data[0])
        key = "last_hidden_state" if "last_hidden_state" in a else "logits"
        assert torch.equal(a[key], b[key])


def test_llama_hits_target_dims_with_grouped_heads(tmp_path):
    teacher = llama()
    data = batches(60)
    targets = {"hidden_size": 24, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 20}
    student = prune_from_teacher(teacher, targets, data, causal_lm_loss)
    attn = student.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (2 * 8, 24) and attn.k_proj.weight.shape == (8, 24)
    assert attn.o_proj.weight.shape == (24, 16) and student.model.layers[0].mlp.down_proj.weight.shape == (24, 20)
    assert student.config.head_dim == 8 and student.config.num_hidden_layers == 3
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()  # still tied
    logits = student(**data[0]).logits
    assert logits.shape == (6, 10, 60) and torch.isfinite(logits).all()
    # saved and loaded like any student
    student.save_pretrained(tmp_path / "s")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "s").eval()
    with torch.no_grad():
        assert torch.equal(again(**data[0]).logits, student.eval()(**data[0]).logits)


def test_a_planted_dead_head_ranks_last_and_is_dropped():
    teacher = bert()
    dead = 2
    with torch.no_grad():  # head 2 of layer 1 writes nothing: its output columns are zero
        teacher.encoder.layer[1].attention.output.dense.weight[:, dead * 8:(dead + 1) * 8] = 0
    data = batches(50)
    importance = mask_importance(teacher, data, embedding_contrastive_loss)
    assert importance.heads[1, dead] == 0
    assert (importance.heads[1, [0, 1, 3]] > 0).all()
    assert int(importance.heads[1].argmin()) == dead
    plan = plan_pruning(teacher, importance, {"num_attention_heads": 3, "hidden_size": 24})
    assert plan.heads[1].tolist() == [0, 1, 3]


def test_a_planted_dead_llama_head_and_layer_are_dropped():
    teacher = llama(layers=4)
    with torch.no_grad():
        teacher.model.layers[0].self_attn.o_proj.weight[:, 3 * 8:4 * 8] = 0  # head 3 of layer 0: dead
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()               # layer 2 adds nothing
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
    importance = mask_importance(teacher, batches(60), causal_lm_loss)
    assert importance.layers[2] == 0 and (importance.layers[[0, 1, 3]] > 0).all()
    assert int(importance.heads[0].argmin()) == 3
    plan = plan_pruning(teacher, importance, {"num_attention_heads": 2, "num_hidden_layers": 3})
    assert plan.layers == [0, 1, 3]
    # two kv groups kept (the default), one query head each; group 1 (heads 2, 3) keeps head 2
    assert plan.kv[0].tolist() == [0, 1] and 2 in plan.heads[0].tolist() and 3 not in plan.heads[0].tolist()


def test_plan_on_hand_made_scores():
    teacher = bert(layers=2)
    scores = Importance(heads=torch.tensor([[4.0, 1.0, 3.0, 2.0], [1.0, 1.0, 0.5, 2.0]]),
                        ffn=torch.arange(128, dtype=torch.float).view(2, 64), hidden=-torch.arange(32.0),
                        layers=torch.tensor([1.0, 2.0]), batches=1)
    plan = plan_pruning(teacher, scores, {"num_attention_heads": 2, "hidden_size": 16, "intermediate_size": 3,
                                          "num_hidden_layers": 1})
    assert plan.layers == [1]
    assert plan.heads[0].tolist() == [0, 3]  # layer 1: 2.0 (head 3), then the tie 1.0/1.0 goes to head 0
    assert plan.ffn[0].tolist() == [61, 62, 63]
    assert plan.hidden.tolist() == list(range(16))
    plan = plan_pruning(teacher, scores, {"num_attention_heads": 2, "hidden_size": 16}, layers=[0])
    assert plan.layers == [0] and plan.heads[0].tolist() == [0, 2]


@pytest.mark.parametrize("targets, message", [
    ({"hidden_size": 16, "num_attention_heads": 3}, "head size"),
    ({"intermediate_size": 100}, "from 1 to the teacher's 64"),
    ({"vocab_size": 10}, "cannot prune vocab_size"),
])
def test_bad_targets_are_named(targets, message):
    scores = mask_importance(bert(layers=1), batches(50, n=1), embedding_contrastive_loss)
    with pytest.raises(ValueError, match=message):
        plan_pruning(bert(layers=1), scores, targets)


def test_record_text_formats():
    assert record_text({"text": "a b"}) == "a b"
    assert record_text({"prompt": "q? ", "completion": "a."}) == "q? a."
    assert record_text({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) \
        == "hi\nyo"


def test_embedding_recipe_with_a_pruned_student(tmp_path):
    from conftest import embedding_recipe, numbered_texts_jsonl, tiny_bert_encoder

    from potstill.train import run_recipe

    teacher = tiny_bert_encoder(tmp_path / "teacher", num_hidden_layers=3)
    train = numbered_texts_jsonl(tmp_path / "train.jsonl", ["a small cat sat", "the dog ran far away",
                                                            "rain on the roof", "two plus two is four"] * 6)
    raw = embedding_recipe(tmp_path, teacher, train, name="pruned",
                           student={"init": "pruned", "config": {"hidden_size": 16, "num_attention_heads": 1,
                                                                 "intermediate_size": 20, "num_hidden_layers": 2},
                                    "calibration_batches": 2, "calibration_batch_size": 4},
                           objectives=[{"name": "embedding_mse"}], max_steps=2)
    run_recipe(validate_recipe(raw))
    saved = tmp_path / "runs" / "pruned" / "student"
    config = json.loads((saved / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["intermediate_size"],
            config["num_hidden_layers"]) == (16, 1, 20, 2)
    assert AutoModel.from_pretrained(saved).embeddings.word_embeddings.weight.shape[1] == 16


def test_pruned_recipe_checks():
    base = {"name": "x", "task": "embedding", "teacher": {"path": "t"}, "data": {"train": "a.jsonl"},
            "objectives": [{"name": "embedding_mse"}]}
    with pytest.raises(Exception, match="target dims"):
        validate_recipe({**base, "student": {"init": "pruned", "config": {"hidden_layers": 2}}})
    with pytest.raises(Exception, match="give at least one"):
        validate_recipe({**base, "student": {"init": "pruned"}})
    r = validate_recipe({**base, "student": {"init": "pruned", "layers": [0, 2], "config": {"hidden_size": 16}}})
    assert r.student.calibration_batches == 8


def test_pruned_needs_calibration_data():
    from potstill.students.loading import build_student

    r = validate_recipe({"name": "x", "task": "classification", "teacher": {"path": "t"},
                         "student": {"init": "pruned", "config": {"hidden_size": 16}},
                         "data": {"train": "a.jsonl"}, "objectives": [{"name": "forward_kl"}]})
    with pytest.raises(UserError, match="embedding and causal_lm"):
        build_student(r.student, bert(), seed=0)


def test_causal_lm_task_builds_a_pruned_student(tmp_path):
    from test_causal_lm import SENTENCES, make_tokenizer, recipe, setup_task, write_jsonl
    from test_causal_lm import llama as tiny_llama

    tok = make_tokenizer()
    tiny_llama(len(tok), layers=3, init=0.3).save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": s} for s in SENTENCES * 3])
    student = {"init": "pruned", "config": {"intermediate_size": 16, "num_attention_heads": 2},
               "layers": [0, 2], "calibration_batches": 2, "calibration_batch_size": 4}
    task = setup_task(recipe(tmp_path, tmp_path / "t", train, student=student))
    c = task.student.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers) == (16, 2, 2, 2)
    assert task.student.training and all(p.requires_grad for p in task.student.parameters())
