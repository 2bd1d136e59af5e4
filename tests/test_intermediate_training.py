"""Capturing internals (hidden states, q/k/v) with hooks, and training with objectives on them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import embedding_recipe, fit_until_crash, numbered_texts_jsonl, tiny_bert_encoder
from safetensors.torch import load_file
from test_tasks import TOPICS
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
)

from potstill.assets import minilm_path
from potstill.config import validate_recipe
from potstill.errors import UserError
from potstill.tasks import build_task
from potstill.tasks.internals import Capture, qkv_modules, transformer_layers
from potstill.train import Distiller, build_objectives, run_recipe
from potstill.train import checkpoint as ckpt

torch.set_num_threads(1)


def _ids(vocab=50, b=2, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 4:] = 0
    return ids, mask


# ------------------------------------------------------------------------------------------------- capture


def test_capture_bert_matches_output_hidden_states_and_qkv_modules():
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                intermediate_size=32)).eval()
    ids, mask = _ids()
    bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)  # HF installs its own hooks once

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in bert.modules())

    before = hooks()
    with torch.no_grad(), Capture(bert, hidden=True, qkv_layers=[0, 2]) as cap:
        out = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert hooks() == before  # ours are removed on exit
    assert len(cap.hidden_states) == 4
    for got, want in zip(cap.hidden_states, out.hidden_states, strict=True):
        torch.testing.assert_close(got, want)
    attn = bert.encoder.layer[2].attention.self
    with torch.no_grad():
        h = out.hidden_states[2]
        for got, module in zip(cap.qkv[2], (attn.query, attn.key, attn.value), strict=True):
            torch.testing.assert_close(got, module(h))
    signals = cap.signals(out.last_hidden_state, mask)
    assert signals.token_mask.dtype == torch.bool and set(signals.qkv) == {0, 2}


def test_capture_llama_gpt2_and_vit_layouts():
    torch.manual_seed(0)
    llama = LlamaModel(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)).eval()
    assert transformer_layers(llama) is llama.layers
    q, k, v = qkv_modules(llama.layers[0])
    assert (q.out_features, k.out_features) == (16, 8)  # grouped-query attention: narrower keys
    ids, mask = _ids()
    with torch.no_grad(), Capture(llama, hidden=True, qkv_layers=[1]) as cap:
        out = llama(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for i in range(2):  # HF's last entry is after the final norm; the captured one is the block output
        torch.testing.assert_close(cap.hidden_states[i], out.hidden_states[i])
    assert cap.qkv[1][1].shape == (2, 6, 8)
    gpt2 = GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16)).eval()
    assert transformer_layers(gpt2) is gpt2.h and len(qkv_modules(gpt2.h[0])) == 1  # fused c_attn
    with torch.no_grad(), Capture(gpt2, qkv_layers=[0]) as cap:
        gpt2(input_ids=ids, attention_mask=mask)
    assert [x.shape[-1] for x in cap.qkv[0]] == [16, 16, 16]
    from transformers import ViTConfig, ViTModel

    vit = ViTModel(ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=32)).eval()
    assert transformer_layers(vit) is vit.layers  # this transformers release: layers.i.attention.q_proj, ...
    attn = vit.layers[1].attention
    assert qkv_modules(vit.layers[1]) == (attn.q_proj, attn.k_proj, attn.v_proj)
    with torch.no_grad(), Capture(vit, hidden=True, qkv_layers=[1]) as cap:
        out = vit(pixel_values=torch.rand(2, 1, 8, 8), output_hidden_states=True)
    for i in range(2):
        torch.testing.assert_close(cap.hidden_states[i], out.hidden_states[i])
    assert cap.qkv[1][0].shape == (2, 17, 16)  # CLS + 16 patches
    with pytest.raises(UserError, match="no module"):
        transformer_layers(gpt2, "encoder.layer")
    with pytest.raises(UserError, match="out of range"):
        Capture(gpt2, qkv_layers=[5])


# ------------------------------------------------------------------------------------------------- training


@pytest.fixture
def classifier(tmp_path):
    """A tiny BERT classifier (4 layers × 32, 2 heads, no dropout) with the real MiniLM tokenizer and topic
    sentences."""
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, num_labels=2, id2label={0: "business", 1: "sport"},
                        label2id={"business": 0, "sport": 1}, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # no dropout: the step's values can be recomputed
    folder = tmp_path / "teacher"
    BertForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = [{"text": t, "label": topic} for topic, texts in TOPICS.items() for t in texts] * 8
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, data


def _raw(tmp_path, folder, data, objectives, student=None, **trainer):
    return {"name": "inner", "output_dir": str(tmp_path / "runs"), "task": "classification",
            "teacher": {"path": str(folder)},
            "student": student or {"init": "layers_from_teacher", "layers": [0, 2]},
            "data": {"train": str(data), "eval": str(data), "max_length": 16},
            "objectives": objectives,
            "trainer": {"max_steps": 6, "batch_size": 8, "lr": 3e-3, "log_every": 1, "num_threads": 1, **trainer},
            "eval": {"throughput": False, "compare_before": False}}


def _log(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_logits_hidden_and_attention_objectives_train_together(tmp_path, classifier):
    folder, data = classifier
    objectives = [{"name": "forward_kl", "params": {"temperature": 2.0}},
                  {"name": "hidden_mse", "weight": 2.0},
                  {"name": "minilm_relations", "params": {"relation_heads": 4}},
                  {"name": "attention_kl"}]
    student = {"init": "from_config", "config": {"num_hidden_layers": 2}}  # random init: far from the teacher
    recipe = validate_recipe(_raw(tmp_path, folder, data, objectives, student=student, lr=1e-3))
    run_recipe(recipe)
    steps = [x for x in _log(recipe.run_dir) if "loss" in x]
    for name in ("hidden_mse", "minilm_relations", "attention_kl"):
        values = [x[f"obj/{name}"] for x in steps]
        assert values[-1] < values[0], (name, values)
    first = steps[0]
    want = first["obj/forward_kl"] + 2.0 * first["obj/hidden_mse"] + first["obj/minilm_relations"] + \
        first["obj/attention_kl"]
    assert first["loss"] == pytest.approx(want, rel=1e-5)


def test_hidden_objective_value_is_the_mean_over_real_tokens(tmp_path, classifier):
    """The loop divides an internals objective's sum by the real tokens of the step: the logged value is the
    plain per-token mean of the loss function on the first batch."""
    folder, data = classifier
    recipe = validate_recipe(_raw(tmp_path, folder, data, [{"name": "hidden_mse", "params": {"layers": "last"}}],
                                  max_steps=1, lr=1e-9))
    task = build_task(recipe, run_dir=recipe.run_dir)
    distiller = Distiller(task, build_objectives(recipe), recipe.trainer, run_dir=recipe.run_dir,
                          eval_config=recipe.eval)
    distiller.fit()
    idx = distiller._micro_batch_indices(0)
    batch = task.collate([task.train_records[i] for i in idx], idx)
    with torch.no_grad():
        s = task.student(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")},
                         output_hidden_states=True).hidden_states[-1]
        t = task.teacher(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")},
                         output_hidden_states=True).hidden_states[-1]
    keep = batch["attention_mask"].bool()
    want = (s - t).square().mean(-1)[keep].mean().item()
    got = [x for x in _log(recipe.run_dir) if "loss" in x][0]["obj/hidden_mse"]
    assert got == pytest.approx(want, rel=1e-3)


def test_narrow_student_trains_a_projection_and_resumes_exactly(tmp_path, classifier):
    """A 16-wide student against the 32-wide teacher: hidden_mse learns one projection per layer pair, which is
    checkpointed (objectives.pt, optimizer) and resumed exactly; the saved student has no projection."""
    folder, data = classifier
    student = {"init": "from_config", "config": {"num_hidden_layers": 2, "hidden_size": 16}}
    objectives = [{"name": "hidden_mse"}, {"name": "minilm_relations", "params": {"relation_heads": 2}}]
    base = _raw(tmp_path, folder, data, objectives, student=student, max_steps=6, save_every=2)
    straight = validate_recipe(dict(base, name="straight"))
    run_recipe(straight)
    state = torch.load(ckpt.step_dir(straight.run_dir / "checkpoints", 6) / "objectives.pt")
    assert set(state["hidden_mse"]) == {"projections.0.weight", "projections.1.weight"}
    assert state["hidden_mse"]["projections.0.weight"].shape == (32, 16)

    halted = validate_recipe(dict(base, name="halted"))
    fit_until_crash(halted, 5, KeyboardInterrupt)
    run_recipe(halted, resume=True)
    a = load_file(str(straight.run_dir / "student" / "model.safetensors"))
    b = load_file(str(halted.run_dir / "student" / "model.safetensors"))
    assert not any("projection" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    got = torch.load(ckpt.step_dir(halted.run_dir / "checkpoints", 6) / "objectives.pt")
    for key, value in state["hidden_mse"].items():
        assert torch.equal(got["hidden_mse"][key], value)
    earlier = torch.load(ckpt.step_dir(straight.run_dir / "checkpoints", 4) / "objectives.pt")
    assert not torch.equal(earlier["hidden_mse"]["projections.0.weight"], state["hidden_mse"]["projections.0.weight"])


def test_internals_objective_errors(tmp_path, classifier, digits_recipe):
    folder, data = classifier
    bad = _raw(tmp_path, folder, data, [{"name": "attention_kl"}],
               student={"init": "from_config", "config": {"num_hidden_layers": 2, "num_attention_heads": 4}})
    with pytest.raises(UserError, match="objective 'attention_kl': .*equal head counts"):
        run_recipe(validate_recipe(bad))
    with pytest.raises(UserError, match="teacher layer 9 is out of range"):
        run_recipe(validate_recipe(_raw(tmp_path, folder, data,
                                        [{"name": "hidden_mse", "params": {"layers": [[0, 9]]}}])))
    with pytest.raises(UserError, match="has no parameter 'layer'"):
        run_recipe(validate_recipe(_raw(tmp_path, folder, data, [{"name": "hidden_mse", "params": {"layer": 1}}])))
    digits = dict(digits_recipe, objectives=[{"name": "hidden_mse"}])
    with pytest.raises(UserError, match="need Hugging Face transformer models"):
        run_recipe(validate_recipe(digits))


def test_two_processes_sync_the_projections(tmp_path, classifier):
    """2 gloo processes × batch 4 with a learned projection (hidden_mse, narrow student) end with the student
    and projections of 1 process × batch 8: the projections' gradients are averaged like the student's."""
    import yaml
    from conftest import accelerate_launch

    folder, data = classifier
    student = {"init": "from_config", "config": {"num_hidden_layers": 2, "hidden_size": 16}}
    raw = _raw(tmp_path, folder, data, [{"name": "forward_kl"}, {"name": "hidden_mse"}], student=student,
               max_steps=3, batch_size=4)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(dict(raw, name="two")))
    proc = accelerate_launch(tmp_path, path, "--multi_gpu", port=29567)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = validate_recipe(dict(raw, name="one", trainer={**raw["trainer"], "batch_size": 8}))
    run_recipe(one)
    a = load_file(str(tmp_path / "runs" / "two" / "student" / "model.safetensors"))
    b = load_file(str(one.run_dir / "student" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    pa = torch.load(ckpt.step_dir(tmp_path / "runs" / "two" / "checkpoints", 3) / "objectives.pt")["hidden_mse"]
    pb = torch.load(ckpt.step_dir(one.run_dir / "checkpoints", 3) / "objectives.pt")["hidden_mse"]
    for key in pa:
        torch.testing.assert_close(pa[key], pb[key], rtol=1e-4, atol=1e-5)


def test_embedding_task_narrow_student_with_projection_and_hidden_states(tmp_path):
    """Embedding distillation into a student half the teacher's width: embedding_mse learns a projection,
    hidden_mse reads the live teacher's hidden states next to the cached embeddings, and the saved student
    is a plain 16-dimensional sentence-transformers model."""
    from sentence_transformers import SentenceTransformer

    folder = tiny_bert_encoder(tmp_path / "encoder", num_hidden_layers=4)
    data = numbered_texts_jsonl(tmp_path / "texts.jsonl", [t for texts in TOPICS.values() for t in texts] * 8)
    recipe = validate_recipe(embedding_recipe(
        tmp_path, folder, data, name="emb", eval_data=data,
        student={"init": "from_config", "config": {"num_hidden_layers": 2, "hidden_size": 16}},
        objectives=[{"name": "embedding_mse", "params": {"normalize": True}}, {"name": "hidden_mse"}],
        max_steps=6, lr=3e-3, log_every=1))
    summary = run_recipe(recipe)
    steps = [x for x in _log(recipe.run_dir) if "loss" in x]
    assert steps[-1]["obj/embedding_mse"] < steps[0]["obj/embedding_mse"]
    assert steps[-1]["obj/hidden_mse"] < steps[0]["obj/hidden_mse"]
    after = summary["table"][-1]
    assert "neighbour_recall@10" in after and "cosine_to_teacher" not in after  # different widths
    state = torch.load(ckpt.step_dir(recipe.run_dir / "checkpoints", 6) / "objectives.pt")
    assert state["embedding_mse"]["projection.weight"].shape == (32, 16)
    model = SentenceTransformer(str(recipe.run_dir / "student"), device="cpu")
    assert model.encode(["A goal in the last minute."]).shape == (1, 16)


def test_layers_path_and_a_pretrained_compact_student(tmp_path, classifier):
    """Blocks given by module path; the student starts from a compact pre-trained model (Well-Read Students:
    pre-train compact, then distil), narrower than the teacher."""
    folder, data = classifier
    compact = tmp_path / "compact"
    torch.manual_seed(1)
    tok = AutoTokenizer.from_pretrained(folder)
    BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=32, num_labels=2,
                                             id2label={0: "business", 1: "sport"},
                                             label2id={"business": 0, "sport": 1})).save_pretrained(compact)
    raw = _raw(tmp_path, folder, data, [{"name": "forward_kl"}, {"name": "hidden_mse", "params": {"layers": "last"}}],
               student={"init": "pretrained", "path": str(compact), "layers_path": "bert.encoder.layer"},
               max_steps=2)
    raw["teacher"]["layers_path"] = "bert.encoder.layer"
    summary = run_recipe(validate_recipe(raw))
    assert summary["steps"] == 2
    raw["teacher"]["layers_path"] = "encoder.layer"
    with pytest.raises(UserError, match="has no module 'encoder.layer'"):
        run_recipe(validate_recipe(dict(raw, name="badpath")))


@pytest.mark.parametrize("task", ["ranking", "vision_language", "masked_lm"])
def test_tasks_without_internals_refuse_internal_objectives_in_one_line(task):
    """These tasks' signals carry no hidden states or q/k/v: an objective on internals is a recipe mistake named
    by its field, before any model loads (it used to end in an AttributeError inside the loop)."""
    from test_config import minimal

    from potstill.errors import UserError
    from potstill.train.run import build_objectives

    raw = minimal(task)
    raw["objectives"] = [{"name": "hidden_mse"}]
    with pytest.raises(UserError, match=f"objectives.0.name: hidden_mse .* the {task} task does not capture"):
        build_objectives(validate_recipe(raw), None)
