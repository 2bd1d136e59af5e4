"""PromptKD: the loss against hand-computed values, and a prompt-only student whose tower stays frozen."""

from __future__ import annotations

import math

import pytest
import torch

from potstill.errors import UserError
from potstill.losses.promptkd import clip_logits, promptkd_loss
from potstill.students.promptkd import ProbeStudent, probe_hidden_for, probe_student, prompted_vit, trainable_parameters

torch.set_num_threads(1)


def tiny_vit(layers: int = 2):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    return ViTModel(ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=layers,
                              num_attention_heads=2, intermediate_size=32), add_pooling_layer=False)


def test_clip_logits_normalise_both_sides():
    logits = clip_logits(torch.tensor([[3.0, 4.0]]), torch.tensor([[2.0, 0.0], [0.0, 5.0]]), scale=10.0)
    assert torch.allclose(logits, torch.tensor([[6.0, 8.0]]))


def test_promptkd_loss_hand_values():
    text = torch.eye(2)
    teacher, student = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])  # student's norm does not matter
    # T = 1, s = 1: z_T = (1, 0), z_S = (0, 1): KL = (σ(1) − σ(−1))·1 = tanh(1/2)
    assert promptkd_loss(student, teacher, text, scale=1.0).item() == pytest.approx(math.tanh(0.5), abs=1e-6)
    # T = 2: KL of softmax((0.5, 0)) vs softmax((0, 0.5)) = tanh(1/4)·0.5, times T² = 4
    assert promptkd_loss(student, teacher, text, scale=1.0, temperature=2.0).item() == pytest.approx(
        4 * 0.5 * math.tanh(0.25), abs=1e-6)
    assert promptkd_loss(teacher * 2, teacher, text).item() == pytest.approx(0.0, abs=1e-7)


def test_only_prompts_and_projector_get_gradients_and_the_tower_is_unchanged():
    vit = tiny_vit()
    tower_before = {k: v.clone() for k, v in vit.state_dict().items()}
    student = prompted_vit(vit, embed_dim=4, prompts=3, projector_hidden=8, seed=0)
    student.train()
    assert not student.tower.training  # the locked tower stays in eval mode
    x, teacher, text = torch.rand(5, 1, 8, 8), torch.randn(5, 4), torch.randn(3, 4)
    loss = promptkd_loss(student(x), teacher, text)
    loss.backward()
    trained = {n for n, p in student.named_parameters() if p.grad is not None}
    assert trained == {"prompts", "projector.0.weight", "projector.0.bias", "projector.2.weight", "projector.2.bias"}
    assert student.prompts.grad.abs().sum() > 0  # the prompts do reach the output through the frozen layers
    # 2 layers × 3 prompts × 16 + (16·8 + 8) + (8·4 + 4)
    assert trainable_parameters(student) == 96 + 136 + 36
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    before = loss.item()
    for _ in range(5):
        opt.zero_grad()
        loss = promptkd_loss(student(x), teacher, text)
        loss.backward()
        opt.step()
    assert loss.item() < before
    for k, v in vit.state_dict().items():
        assert torch.equal(v, tower_before[k]), k


def test_prompt_tokens_enter_every_prompted_layer_and_the_plain_path_matches_the_vit():
    vit = tiny_vit()
    x = torch.rand(2, 1, 8, 8)
    probe = ProbeStudent(vit, 4, hidden=8)
    hidden = probe.tokens(x)
    for i in range(2):
        hidden = probe.layer(i, hidden)
    assert torch.allclose(probe.cls_feature(hidden), vit(pixel_values=x).last_hidden_state[:, 0], atol=1e-5)
    deep, shallow = prompted_vit(vit, embed_dim=4, depth=2), prompted_vit(vit, embed_dim=4, depth=1)
    with torch.no_grad():
        shallow.prompts.copy_(deep.prompts[:1])
        out = deep(x)
        deep.prompts[1].add_(torch.randn(4, 16))  # the second layer's own prompts change the output
        assert not torch.allclose(out, deep(x))
        assert deep.prompts.shape == (2, 4, 16) and shallow.prompts.shape == (1, 4, 16)
    with pytest.raises(UserError, match="depth"):
        prompted_vit(vit, embed_dim=4, depth=3)
    with pytest.raises(UserError, match="ViT image tower"):
        prompted_vit(torch.nn.Linear(2, 2), embed_dim=4)


def test_probe_has_the_budget_of_the_prompted_student():
    vit = tiny_vit()
    student = prompted_vit(vit, embed_dim=4, prompts=3, projector_hidden=8)
    budget = trainable_parameters(student)  # 268
    assert probe_hidden_for(budget, 16, 4) == round((268 - 4) / 21)  # 13
    probe = probe_student(vit, embed_dim=4, budget=budget)
    assert trainable_parameters(probe) == 13 * 21 + 4
    assert trainable_parameters(ProbeStudent(vit, 4, hidden=0)) == 16 * 4 + 4  # linear probe


def test_lock_refreezes_the_tower_after_a_builder_unfroze_it():
    student = prompted_vit(tiny_vit(), embed_dim=4)
    for p in student.parameters():
        p.requires_grad_(True)
    student.lock()
    assert {n for n, p in student.named_parameters() if p.requires_grad} == {
        "prompts", "projector.0.weight", "projector.0.bias", "projector.2.weight", "projector.2.bias"}
