"""Self-J: the loss against hand-computed values, the labels, and the judge on a tiny Llama built from a config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from potstill.data.self_judge import (
    SelfJudgeRecord,
    build_records,
    cosine_similarities,
    judge_prompt,
    recalibrated_label,
)
from potstill.errors import UserError
from potstill.losses.self_judge import expected_score, score_targets, self_judge, self_judge_terms

pytestmark = pytest.mark.usefixtures("one_thread")

# --- loss -----------------------------------------------------------------------------------------------


def test_expected_score_is_the_mean_digit():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]]) + 1e-30)
    assert torch.allclose(expected_score(logits), torch.tensor([0.75, 2.0]), atol=1e-6)
    assert torch.allclose(expected_score(logits[:1], torch.tensor([1.0, 5.0, 9.0])), torch.tensor([4.0]))


def test_score_targets_hard_and_two_hot():
    scores = torch.tensor([2.4, 2.6, 10.0, -1.0])
    assert score_targets(scores, 10).tolist() == [2, 3, 9, 0]
    soft = score_targets(torch.tensor([2.25, 9.0]), 10, mode="two_hot")
    want = torch.zeros(2, 10)
    want[0, 2], want[0, 3], want[1, 9] = 0.75, 0.25, 1.0
    assert torch.allclose(soft, want)
    assert torch.allclose((soft * torch.arange(10.0)).sum(-1), torch.tensor([2.25, 9.0]))
    with pytest.raises(ValueError, match="mode"):
        score_targets(scores, 10, mode="soft")


def test_self_judge_loss_by_hand():
    # p_free = (.5, .5), p_ref = (.75, .25), label 0
    student = torch.zeros(1, 2, requires_grad=True)
    teacher = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)
    labels = torch.tensor([0])
    ce_ref, ce_free = -math.log(0.75), math.log(2.0)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    loss = self_judge(student, teacher, labels=labels)
    assert loss.item() == pytest.approx(ce_ref + 0.3 * ce_free + 2.0 * kl, abs=1e-6)
    assert self_judge(student, teacher, labels=labels, distill_weight=0.0).item() == pytest.approx(
        ce_ref + 0.3 * ce_free, abs=1e-6)
    terms = self_judge_terms(student, teacher, labels=labels)
    assert terms["distill"].item() == pytest.approx(kl, abs=1e-6)
    # the reference-guided view is taught by its label only: the KL reaches the student alone
    self_judge(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None
    # d KL / d z_free = p_free - p_ref, times β = 2
    assert torch.allclose(student.grad, 2.0 * torch.tensor([[0.5 - 0.75, 0.5 - 0.25]]), atol=1e-6)


def test_self_judge_masks_rows_and_soft_labels():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    labels = torch.randint(0, 5, (2, 3), generator=g)
    full = self_judge(student, teacher, labels=labels, reduction="none")
    masked_labels = labels.clone()
    masked_labels[1, 2] = -100
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 0] = False
    part = self_judge(student, teacher, labels=masked_labels, mask=mask, reduction="none")
    assert part[0, 0] == 0 and part[1, 2] == 0
    kept = torch.ones(2, 3, dtype=torch.bool)
    kept[0, 0] = kept[1, 2] = False
    assert self_judge(student, teacher, labels=masked_labels, mask=mask).item() == pytest.approx(
        full[kept].mean().item(), abs=1e-6)
    one_hot = torch.nn.functional.one_hot(labels, 5).float()
    assert torch.allclose(self_judge(student, teacher, labels=one_hot), self_judge(student, teacher, labels=labels),
                          atol=1e-6)
    assert self_judge(student, student.clone()).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="differ"):
        self_judge(student, teacher[..., :4])


# --- labels ---------------------------------------------------------------------------------------------


def test_judge_prompt_views():
    with_ref = judge_prompt("What is 2 + 2?", "2 + 2 = 5", "2 + 2 = 4")
    without = judge_prompt("What is 2 + 2?", "2 + 2 = 5")
    assert "[Reference]\n2 + 2 = 4" in with_ref and "reference answer" in with_ref
    assert "[Reference]" not in without and "reference" not in without
    assert without.endswith("[Answer]\n2 + 2 = 5") and "0 to 9" in without


def test_recalibrated_label_by_hand():
    assert recalibrated_label(6.0, 0.8) == pytest.approx(0.5 * 6 + 0.5 * 9 * 0.8)
    assert recalibrated_label(4.0, -0.3) == pytest.approx(2.0)  # a negative cosine counts as 0
    assert recalibrated_label(4.0, 1.0, similarity_weight=0.25) == pytest.approx(0.75 * 4 + 0.25 * 9)
    assert np.allclose(recalibrated_label(np.array([0.0, 9.0]), np.array([1.0, 0.0])), [4.5, 4.5])
    with pytest.raises(UserError, match="similarity_weight"):
        recalibrated_label(1.0, 1.0, similarity_weight=1.5)


def test_cosine_similarities_and_records():
    table = {"a": [1.0, 0.0], "b": [1.0, 1.0], "c": [0.0, 2.0]}

    def embed(texts):
        return np.array([table[t] for t in texts])

    assert np.allclose(cosine_similarities(["a", "b"], ["b", "c"], embed), [1 / math.sqrt(2), 1 / math.sqrt(2)])
    records = build_records(["q1", "q2"], ["a", "b"], ["b", "b"], [3.0, 9.0], [0.0, 1.0])
    assert records[0] == SelfJudgeRecord("q1", "a", "b", 3.0, 0.0, 1.5)
    assert records[1].label == pytest.approx(9.0) and records[1].record()["similarity"] == 1.0
    with pytest.raises(UserError, match="self_evals has 1 values"):
        build_records(["q1", "q2"], ["a", "b"], ["b", "b"], [3.0], [0.0, 1.0])
    with pytest.raises(UserError, match="2 responses but 1 references"):
        cosine_similarities(["a", "b"], ["b"], embed)


# --- judge ----------------------------------------------------------------------------------------------


def _tiny_judge():
    from conftest import tiny_digit_lm

    from potstill.students.self_judge import SelfJudge

    return SelfJudge(*tiny_digit_lm(), rank=4)


def test_untrained_judge_is_the_models_own_self_evaluation():
    judge = _tiny_judge()
    questions, replies = ["what is 2 + 2?", "what is 3 + 4?"], ["2 + 2 = 4", "3 + 4 = 9 and more words"]
    prompts = judge.prompts(questions, replies)
    assert prompts[0].endswith("[Answer]\n2 + 2 = 4\nScore:")  # no chat template: a plain prompt
    scores = judge.score(questions, replies, batch_size=1)
    judge.tokenizer.padding_side = "right"
    for prompt, score in zip(prompts, scores, strict=True):
        ids = judge.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            digit_logits = judge.model(**ids).logits[0, -1, judge.token_ids]
        want = (torch.softmax(digit_logits, -1) * torch.arange(10.0)).sum()
        assert score.item() == pytest.approx(want.item(), abs=1e-4)
    assert judge.tokenizer.padding_side == "right"  # restored after left-padded batching
    batched = judge.score(questions, replies, batch_size=2)
    assert torch.allclose(batched, scores, atol=1e-4)


def test_fit_score_head_learns_the_labels():
    from potstill.students.self_judge import fit_score_head

    judge = _tiny_judge()
    g = torch.Generator().manual_seed(1)
    free, ref = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
    labels = torch.where(free[:, 0] > 0, 8.0, 1.0)
    history = fit_score_head(judge.head, free, ref, labels, epochs=60, batch_size=8, lr=1e-2)
    assert history[-1] < history[0]
    scores = judge.scores_from_features(free)
    assert scores[labels > 4].min() > scores[labels < 4].max()
    with pytest.raises(UserError, match="one of each"):
        fit_score_head(judge.head, free, ref[:3], labels)


def test_best_of_n_and_abstention():
    from potstill.students.self_judge import answer_or_abstain, best_of_n

    assert best_of_n([1.0, 3.0, 2.0, 5.0, 5.0, 0.0], [0, 0, 0, 1, 1, 1]) == {0: 1, 1: 3}
    assert answer_or_abstain([1.0, 4.5, 7.0], 4.5).tolist() == [False, True, True]
    with pytest.raises(UserError, match="group ids"):
        best_of_n([1.0, 2.0], [0])


def test_score_token_ids_refuses_split_digits():
    from potstill.students.self_judge import score_token_ids

    class SplitsSeven:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1, 2] if text == "7" else [int(text) + 10]}

    with pytest.raises(UserError, match="score 7 is 2 tokens"):
        score_token_ids(SplitsSeven())
    assert score_token_ids(SplitsSeven(), max_score=5) == [10, 11, 12, 13, 14, 15]
