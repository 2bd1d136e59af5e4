"""trainer.gradient_checkpointing: transformers' checkpointing on the student, same loss and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_text_classifier
from safetensors.torch import load_file

from potstill.config import validate_recipe
from potstill.errors import UserError
from potstill.students.gradient_checkpointing import enable_gradient_checkpointing
from potstill.train import run_recipe
from potstill.train.run import fit_recipe


def _loss_grads_and_block_calls(model, batch):
    calls = []
    hook = model.bert.encoder.layer[0].intermediate.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)  # the same dropout masks for both models
    out = model(**batch)
    loss = torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2]))
    loss.backward()
    hook.remove()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)


def test_same_loss_and_grads_with_block_recomputed():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    plain = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=3))
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed)
    assert checkpointed.bert.encoder.layer[0].gradient_checkpointing
    assert not plain.bert.encoder.layer[0].gradient_checkpointing
    plain.train()
    checkpointed.train()
    batch = {"input_ids": torch.tensor([[1, 5, 7, 2], [1, 9, 2, 0], [1, 3, 4, 2]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])}
    loss_a, grads_a, calls_a = _loss_grads_and_block_calls(plain, batch)
    loss_b, grads_b, calls_b = _loss_grads_and_block_calls(checkpointed, batch)
    assert (calls_a, calls_b) == (1, 2)  # the block ran again in backward: its activations were not kept
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-7)


def test_run_with_checkpointing_ends_with_the_same_student(tmp_path):
    raw = tiny_text_classifier(tmp_path)
    plain = validate_recipe(dict(raw, name="plain"))
    checkpointed = validate_recipe(dict(raw, name="ckpt", trainer={**raw["trainer"], "gradient_checkpointing": True}))
    run_recipe(plain)
    task, _, _ = fit_recipe(checkpointed)
    assert task.student.bert.encoder.layer[0].gradient_checkpointing
    wa = load_file(str(plain.run_dir / "student" / "model.safetensors"))
    wb = load_file(str(checkpointed.run_dir / "student" / "model.safetensors"))
    first = load_file(str(tmp_path / "teacher" / "model.safetensors"))
    moved = [k for k in wa if k in first and wa[k].shape == first[k].shape and not torch.equal(wa[k], first[k])]
    assert moved  # training changed the student
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6)


def test_factory_student_is_refused(digits_recipe):
    recipe = validate_recipe(dict(digits_recipe, trainer={**digits_recipe["trainer"], "gradient_checkpointing": True}))
    message = "^field trainer.gradient_checkpointing: needs a Hugging Face student.*Sequential"
    with pytest.raises(UserError, match=message):
        run_recipe(recipe)
