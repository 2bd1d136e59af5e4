"""ULD and GOLD's hybrid (potstill.losses.uld): hand-computed values on V=3 vs V=4, a float64 reference, the
chunked path, and equality with TRL's ULDLoss called on tensors."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

from potstill.losses.catalogue import OBJECTIVES
from potstill.losses.objective_params import check_params
from potstill.losses.uld import gold, uld

P_S = [0.5, 0.3, 0.2]  # student, V = 3
P_T = [0.1, 0.4, 0.3, 0.2]  # teacher, V = 4
MATCHED = torch.tensor([[0, 1], [2, 0]])  # teacher 0 ↔ student 1, teacher 2 ↔ student 0


def _logits(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


def test_uld_hand_value_v3_vs_v4():
    # sorted: s = [.5 .3 .2 0], t = [.4 .3 .2 .1] → |.1| + 0 + 0 + |−.1| = 0.2
    value = uld(_logits(P_S)[None], _logits(P_T)[None])
    assert value.item() == pytest.approx(0.2, abs=1e-6)
    # symmetric: the wider side may be the student's too
    assert uld(_logits(P_T)[None], _logits(P_S)[None]).item() == pytest.approx(0.2, abs=1e-6)


def test_uld_is_zero_for_a_permutation_and_padding_with_zeros():
    teacher = torch.tensor([[0.2, 0.0, 0.5, 0.3]]).log()  # a permutation of the student's, plus an empty id
    assert uld(_logits(P_S)[None], teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_uld_log_scale_multiplies_the_probabilities():
    # p_s · 0.5 = [.25 .15 .1 0] against [.4 .3 .2 .1]: .15 + .15 + .1 + .1 = 0.5
    value = uld(_logits(P_S)[None], _logits(P_T)[None], student_log_scale=torch.tensor([math.log(0.5)]))
    assert value.item() == pytest.approx(0.5, abs=1e-6)
    # the teacher's factor too: [.05 .2 .15 .1] sorted [.2 .15 .1 .05] vs [.5 .3 .2 0] = .3 + .15 + .1 + .05
    value = uld(_logits(P_S)[None], _logits(P_T)[None], teacher_log_scale=torch.tensor([math.log(0.5)]))
    assert value.item() == pytest.approx(0.6, abs=1e-6)


def test_uld_temperature_and_teacher_temperature():
    s, t = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    e = math.e
    ps = [e / (e + 2), 1 / (e + 2), 1 / (e + 2)]  # softmax([2, 0, 0] / 2)
    want = abs(ps[0] - 0.25) + 2 * abs(ps[1] - 0.25) + 0.25
    assert uld(s, t, temperature=2.0).item() == pytest.approx(want, abs=1e-6)
    # teacher at T = 1 on logits [4, 0, 0, 0]: [e⁴, 1, 1, 1] / (e⁴ + 3)
    t2 = torch.tensor([[4.0, 0.0, 0.0, 0.0]])
    pt = [e**4 / (e**4 + 3)] + [1 / (e**4 + 3)] * 3
    want = abs(ps[0] - pt[0]) + 2 * abs(ps[1] - pt[1]) + pt[3]
    assert uld(s, t2, temperature=2.0, teacher_temperature=1.0).item() == pytest.approx(want, abs=1e-6)


def test_gold_hybrid_hand_values():
    # matched: s^M = [p_s[1], p_s[0]] = [.3 .5], t^M = [p_t[0], p_t[2]] = [.1 .3]; w = 2 / 4
    # unmatched: s = [.2], t = [.4 .2] → |.2 − .4| + |0 − .2| = 0.4
    s, t = _logits(P_S)[None], _logits(P_T)[None]
    kl_t_s = 0.1 * math.log(0.1 / 0.3) + 0.3 * math.log(0.3 / 0.5)  # β = 0: KL(t ‖ s), unnormalised
    assert gold(s, t, matched_ids=MATCHED, beta=0.0).item() == pytest.approx(0.5 * kl_t_s + 0.2, abs=1e-6)
    m = [0.2, 0.4]  # β = 0.5: ½ t + ½ s
    jsd = 0.5 * (0.1 * math.log(0.1 / m[0]) + 0.3 * math.log(0.3 / m[1])) + 0.5 * (
        0.3 * math.log(0.3 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    assert gold(s, t, matched_ids=MATCHED).item() == pytest.approx(0.5 * jsd + 0.2, abs=1e-6)
    kl_s_t = 0.3 * math.log(0.3 / 0.1) + 0.5 * math.log(0.5 / 0.3)  # β = 1: KL(s ‖ t)
    value = gold(s, t, matched_ids=MATCHED, beta=1.0, matched_weight=0.25)
    assert value.item() == pytest.approx(0.25 * kl_s_t + 0.75 * 0.4, abs=1e-6)


def test_gold_hybrid_without_matches_is_uld_and_fully_matched_is_jsd():
    s, t = torch.randn(5, 3), torch.randn(5, 4)
    torch.testing.assert_close(gold(s, t), uld(s, t))
    same = torch.randn(4, 3)
    student = torch.randn(4, 3)
    identity = torch.tensor([[0, 0], [1, 1], [2, 2]])
    from potstill.losses import generalized_jsd

    torch.testing.assert_close(gold(student, same, matched_ids=identity),
                               generalized_jsd(student, same), rtol=1e-5, atol=1e-6)


def _reference(s, t, s_scale, t_scale, matched, beta, w, rows):
    """Float64, one row at a time, straight from the formulas."""
    total = 0.0
    for i in rows:
        ps = torch.softmax(s[i].double(), -1) * math.exp(s_scale[i])
        pt = torch.softmax(t[i].double(), -1) * math.exp(t_scale[i])
        t_ids, s_ids = [int(a) for a, _ in matched], [int(b) for _, b in matched]
        sm, tm = ps[s_ids], pt[t_ids]
        ls, lt = sm.clamp_min(1e-8).log(), tm.clamp_min(1e-8).log()
        lm = torch.log(beta * lt.exp() + (1 - beta) * ls.exp())
        jsd = beta * (lt.exp() * (lt - lm)).sum() + (1 - beta) * (ls.exp() * (ls - lm)).sum()
        su = sorted((ps[j].item() for j in range(len(ps)) if j not in s_ids), reverse=True)
        tu = sorted((pt[j].item() for j in range(len(pt)) if j not in t_ids), reverse=True)
        width = max(len(su), len(tu))
        su, tu = su + [0.0] * (width - len(su)), tu + [0.0] * (width - len(tu))
        l1 = sum(abs(a - b) for a, b in zip(su, tu, strict=True))
        total += (w * jsd.item() if matched else 0.0) + (1 - w) * l1
    return total / len(rows)


@pytest.mark.parametrize(("chunk_size", "widths"), [(None, (6, 9)), (2, (6, 9)), (None, (9, 6))])
def test_float64_reference_with_mask_and_scales(chunk_size, widths):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, widths[0], generator=g) * 2, torch.randn(2, 4, widths[1], generator=g) * 2
    s_scale, t_scale = -torch.rand(2, 4, generator=g), -torch.rand(2, 4, generator=g)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    rows = [i for i, keep in enumerate(mask.flatten().tolist()) if keep]
    flat = (s.flatten(0, 1), t.flatten(0, 1), s_scale.flatten().tolist(), t_scale.flatten().tolist())
    matched = torch.tensor([[0, 3], [4, 1], [5, 5]])
    got = gold(s, t, matched_ids=matched, beta=0.3, student_log_scale=s_scale, teacher_log_scale=t_scale,
               mask=mask, chunk_size=chunk_size)
    assert got.item() == pytest.approx(_reference(*flat, matched.tolist(), 0.3, 3 / widths[1], rows), rel=1e-5)
    got = uld(s, t, student_log_scale=s_scale, teacher_log_scale=t_scale, mask=mask, chunk_size=chunk_size)
    assert got.item() == pytest.approx(_reference(*flat, [], 0.5, 0.0, rows), rel=1e-5)


def test_chunked_gradients_match_including_the_student_scale():
    g = torch.Generator().manual_seed(1)
    s0, t = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 4, generator=g)
    scale0 = -torch.rand(3, 5, generator=g)
    labels = torch.tensor([[1, 2, -100, 3, 4]] * 3)
    grads = []
    for chunk_size in (None, 4):
        s, scale = s0.clone().requires_grad_(True), scale0.clone().requires_grad_(True)
        loss = gold(s, t, matched_ids=torch.tensor([[0, 6], [3, 2]]), student_log_scale=scale,
                           labels=labels, chunk_size=chunk_size)
        loss.backward()
        grads.append((loss.detach(), s.grad, scale.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    assert grads[0][1][:, 2].abs().sum() == 0 and grads[0][1].abs().sum() > 0


def test_reductions_and_bad_inputs():
    s, t = torch.randn(2, 3, 3), torch.randn(2, 3, 4)
    per_row = uld(s, t, reduction="none")
    assert per_row.shape == (2, 3)
    torch.testing.assert_close(uld(s, t, reduction="sum"), per_row.sum())
    torch.testing.assert_close(uld(s, t), per_row.mean())
    with pytest.raises(ValueError, match="row shape"):
        uld(s, t[:, :2])
    with pytest.raises(ValueError, match="student_log_scale"):
        uld(s, t, student_log_scale=torch.zeros(2))
    with pytest.raises(ValueError, match="outside the student"):
        gold(s, t, matched_ids=torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match="at most once"):
        gold(s, t, matched_ids=torch.tensor([[0, 1], [1, 1]]))
    with pytest.raises(ValueError, match="temperature"):
        uld(s, t, temperature=0.0)


def test_catalogue_entries():
    assert OBJECTIVES["uld"].defaults["temperature"] == 1.0
    assert OBJECTIVES["gold"].defaults["beta"] == 0.5 and OBJECTIVES["gold"].defaults["matched_weight"] is None
    assert check_params("gold", {"matched_weight": 1.5})
    assert not check_params("gold", {"matched_weight": 0.4, "beta": 0.1})
    # what the task fills in from the batch is no recipe parameter
    assert check_params("gold", {"matched_ids": [[0, 1]]}) and check_params("uld", {"student_log_scale": 0.0})
    assert "matched_ids" not in OBJECTIVES["gold"].defaults


# ------------------------------------------------------------------------------------------------- TRL


def _trl_uld(hybrid: bool, student_vocab: dict | None = None, teacher_vocab: dict | None = None):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    config = SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
        uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
        use_extended_uld=False, uld_token_merge_strategy="observed", uld_use_hybrid_loss=hybrid,
        uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=0.5)
    tokenizers = {}
    if hybrid:
        tokenizers = {"student_tokenizer": SimpleNamespace(get_vocab=lambda: student_vocab),
                      "teacher_tokenizer": SimpleNamespace(get_vocab=lambda: teacher_vocab)}
    return gold.ULDLoss(config, **tokenizers)


def test_equal_to_trl_uld_on_positional_rows():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(1, 6, 5, generator=g) * 3, torch.randn(1, 6, 8, generator=g) * 3
    ids = torch.zeros(1, 6, dtype=torch.long)
    want = _trl_uld(False)(s, t, ids, ids, ids, ids)
    torch.testing.assert_close(uld(s, t), want.reshape(()), rtol=1e-5, atol=1e-6)


def test_equal_to_trl_gold_hybrid():
    student_vocab = {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}
    teacher_vocab = {"x": 0, "b": 1, "y": 2, "a": 3, "z": 4, "e": 5, "w": 6, "v": 7}
    matched = torch.tensor([[3, 0], [1, 1], [5, 4]])  # the strings both vocabularies have: a, b, e
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(1, 6, 5, generator=g) * 3, torch.randn(1, 6, 8, generator=g) * 3
    ids = torch.zeros(1, 6, dtype=torch.long)
    want = _trl_uld(True, student_vocab, teacher_vocab)(s, t, ids, ids, ids, ids)
    torch.testing.assert_close(gold(s, t, matched_ids=matched), want.reshape(()), rtol=1e-5, atol=1e-6)
