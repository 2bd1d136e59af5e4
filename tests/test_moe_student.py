"""Mixture-of-experts students built from a config next to a dense teacher, and moe_router_aux
(potstill.losses.moe) against hand-computed values and transformers' own load-balancing loss."""

from __future__ import annotations

import math

import pytest
import torch
from test_causal_lm import llama, make_tokenizer
from test_preference_task import setup_task, write_jsonl

from potstill.config import validate_recipe
from potstill.errors import UserError
from potstill.losses import OBJECTIVES
from potstill.losses.moe import RouterLoadBalance, router_load_balance
from potstill.train import run_recipe
from potstill.train.run import build_objectives

MIXTRAL = {"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
           "max_position_embeddings": 64}
QWEN2_MOE = {"model_type": "qwen2_moe", "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
             "shared_expert_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 64}
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "two plus two is four", "rain fell on the old roof"]


def test_router_load_balance_by_hand() -> None:
    # top-1 of 2 experts, rows prefer expert 0 and expert 1: f = (½, ½), P = (½, ½) → 2 · (¼ + ¼) = 1 = k
    assert router_load_balance(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), top_k=1).item() == pytest.approx(1.0)
    # both rows choose expert 0: f = (1, 0), P_0 = (σ(2) + σ(1)) / 2 → 2 · P_0
    sig = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1))
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    assert router_load_balance(logits, top_k=1).item() == pytest.approx(sig[0] + sig[1], abs=1e-6)
    # a masked row is left out: only row 0 → f = (1, 0), P_0 = σ(2)
    mask = torch.tensor([[True, False]])
    assert router_load_balance(logits, top_k=1, mask=mask).item() == pytest.approx(2 * sig[0], abs=1e-6)
    assert router_load_balance(logits, top_k=1, mask=mask, reduction="sum").item() == pytest.approx(2 * sig[0])
    # top-2 of 2 experts: every expert always chosen, f = (1, 1), Σ P = 1 → 2 · 1 = 2 = k
    assert router_load_balance(logits, top_k=2).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="top_k"):
        router_load_balance(logits, top_k=3)


def test_router_load_balance_matches_transformers() -> None:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    layers = tuple(torch.randn(2 * 5, 4, generator=g) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = load_balancing_loss_func(layers, 4, 2, mask)
    assert router_load_balance(layers, top_k=2, mask=mask.bool()).item() == pytest.approx(expected.item(), rel=1e-5)
    assert router_load_balance(layers, top_k=2).item() == pytest.approx(
        load_balancing_loss_func(layers, 4, 2).item(), rel=1e-5)


def test_catalogue_entry() -> None:
    info = OBJECTIVES["moe_router_aux"]
    assert info.kind == "router" and info.stateful and info.defaults == {"top_k": 2}
    with pytest.raises(ValueError, match="top_k"):
        RouterLoadBalance(top_k=0)


@pytest.fixture(scope="module")
def dense_teacher(tmp_path_factory):
    tok = make_tokenizer()
    folder = tmp_path_factory.mktemp("moe") / "teacher"
    llama(len(tok), layers=2, init=0.3).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def moe_recipe(tmp_path, teacher, config=None, objectives=None, **trainer):
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in TEXTS])
    return validate_recipe({
        "name": "moe", "output_dir": str(tmp_path / "runs"), "task": "causal_lm", "seed": 0,
        "teacher": {"path": str(teacher)},
        "student": {"init": "from_config", "config": config or MIXTRAL},
        "data": {"train": data, "eval": data, "max_length": 16},
        "objectives": objectives or [{"name": "forward_kl"}, {"name": "moe_router_aux", "weight": 0.01}],
        "trainer": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "log_every": 1, "num_threads": 1,
                    "hard_label_weight": 1.0, **trainer},
        "eval": {"throughput": False, "compare_before": False}})


@pytest.mark.parametrize(("config", "cls"), [(MIXTRAL, "MixtralForCausalLM"), (QWEN2_MOE, "Qwen2MoeForCausalLM")])
def test_moe_student_from_config_and_its_aux_loss(tmp_path, dense_teacher, config, cls):
    recipe = moe_recipe(tmp_path, dense_teacher, config)
    task = setup_task(recipe)
    assert type(task.student).__name__ == cls and type(task.teacher).__name__ == "LlamaForCausalLM"
    batch = task.to_device(task.collate(task.train_records[:2], [0, 1]))
    student, teacher = task.student_signal(task.student, batch), task.teacher_signal(batch)
    kd, aux = build_objectives(recipe, task)
    value = aux(student, teacher, task.signal_mask(batch)) / task.count_tokens(batch)
    out = task.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_router_logits=True)
    assert value.item() == pytest.approx(out.aux_loss.item(), rel=1e-5)
    assert torch.isfinite(kd(student, teacher, task.signal_mask(batch)))


def _logged(run_dir, key):
    import json

    return [row[key] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in row]


def test_moe_run_logs_router_aux(tmp_path, dense_teacher):
    run_recipe(moe_recipe(tmp_path, dense_teacher))
    values = _logged(tmp_path / "runs" / "moe", "obj/moe_router_aux")
    assert len(values) == 2 and all(2.0 - 1e-4 <= v <= 4.0 for v in values)  # between k and E


def test_moe_student_trains_on_a_teacher_cache_like_on_the_live_teacher(tmp_path, dense_teacher):
    import yaml

    from potstill.cli import main

    raw = moe_recipe(tmp_path, dense_teacher).model_dump(mode="json", exclude_none=True)
    live = raw | {"name": "live"}
    cached = raw | {"name": "cached", "teacher": {"path": str(dense_teacher), "cache": str(tmp_path / "cache")}}
    paths = {}
    for r in (live, cached):
        paths[r["name"]] = tmp_path / f"{r['name']}.yaml"
        paths[r["name"]].write_text(yaml.safe_dump(r))
    vocab = len(make_tokenizer())
    assert main(["cache", str(paths["cached"]), "--k", str(vocab)]) == 0
    for name in ("live", "cached"):
        assert main(["run", str(paths[name])]) == 0
    # k = V: the sparse divergence is the dense one, up to the float16 storage of the cached log-probs
    for key in ("obj/forward_kl", "obj/moe_router_aux", "loss"):
        for a, b in zip(_logged(tmp_path / "runs" / "cached", key), _logged(tmp_path / "runs" / "live", key),
                        strict=True):
            assert a == pytest.approx(b, rel=2e-3), key


def test_moe_router_aux_refusals(tmp_path, dense_teacher):
    with pytest.raises(UserError, match="needs a mixture-of-experts student"):
        setup_task(moe_recipe(tmp_path, dense_teacher, {"num_hidden_layers": 1}))
    with pytest.raises(UserError, match="objectives.1.params.top_k: the student routes each token to 2"):
        setup_task(moe_recipe(tmp_path, dense_teacher, objectives=[
            {"name": "forward_kl"}, {"name": "moe_router_aux", "params": {"top_k": 1}}]))
    with pytest.raises(UserError, match="trainer.fused_lm_head: objective 'moe_router_aux' has no fused form"):
        moe_recipe(tmp_path, dense_teacher, fused_lm_head=True)
