"""Hidden-state and attention objectives against float64 references written here; layer maps; projections."""

from __future__ import annotations

import math

import pytest
import torch

from potstill.losses.attention import attention_mse, relation_logits
from potstill.losses.features import hidden_cosine, hidden_mse, squarehead
from potstill.losses.intermediate import (
    AttentionMSE,
    HiddenCosine,
    HiddenMSE,
    ModelShape,
    SquareHead,
    layer_map,
)
from potstill.losses.minilm import MiniLMAttention, MiniLMRelations, relation_kl

B, T = 3, 7


pytestmark = pytest.mark.usefixtures("one_thread")


def _mask():
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 3:] = False
    return mask


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------- layer maps


def test_layer_maps():
    assert layer_map("uniform", 6, 12) == [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11)]
    assert layer_map("uniform", 2, 6) == [(0, 2), (1, 5)]
    assert layer_map("uniform", 4, 6) == [(0, 1), (1, 2), (2, 4), (3, 5)]
    assert layer_map("uniform", 3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert layer_map("last", 2, 6) == [(1, 5)]
    assert layer_map([[0, 3], [-1, -1]], 2, 6) == [(0, 3), (1, 5)]
    assert layer_map([[-1, -1], [1, 5]], 2, 6, allow_embeddings=True) == [(-1, -1), (1, 5)]
    with pytest.raises(ValueError, match="teacher layer 6 is out of range"):
        layer_map([[0, 6]], 2, 6)
    with pytest.raises(ValueError, match="'uniform', 'last'"):
        layer_map("every-other", 2, 6)
    with pytest.raises(ValueError, match="pair must be"):
        layer_map([[0, 1, 2]], 2, 6)


# ------------------------------------------------------------------------------------------- hidden states


def test_hidden_losses_match_float64_references():
    s, t, mask = _randn(B, T, 5, seed=1), _randn(B, T, 5, seed=2), _mask()
    sd, td = s.double(), t.double()
    per_token = (sd - td).square().mean(-1)
    close(hidden_mse(s, t, mask=mask), per_token[mask].mean())
    close(hidden_mse(s, t, mask=mask, reduction="sum"), per_token[mask].sum())
    cos = 1 - torch.nn.functional.cosine_similarity(sd, td, dim=-1)
    close(hidden_cosine(s, t, mask=mask), cos[mask].mean())
    for normalizer, stat in (("second_moment", td[mask].square().mean()), ("variance", td[mask].var(unbiased=False))):
        got = squarehead(s, t, mask=mask, normalizer=normalizer, eps=0.0)
        close(got, per_token[mask].mean() / stat)


def test_squarehead_is_scale_invariant_and_zero_for_a_copy():
    s, t, mask = _randn(B, T, 6, seed=3), _randn(B, T, 6, seed=4), _mask()
    base = squarehead(s, t, mask=mask, eps=0.0)
    close(squarehead(7.5 * s, 7.5 * t, mask=mask, eps=0.0), base)
    assert squarehead(t.clone(), t, mask=mask).item() == 0.0
    assert base.item() > 0
    s = s.requires_grad_(True)
    squarehead(s, t, mask=mask).backward()
    assert (s.grad[~mask] == 0).all() and s.grad[mask].abs().sum() > 0
    with pytest.raises(ValueError, match="normalizer"):
        squarehead(s, t, normalizer="std")


# ------------------------------------------------------------------------------------------- relations


def _ref_relation_kl(s_rel, t_rel, mask):
    """Float64: per (b, head, query) KL over the real keys, mean over heads and real queries."""
    total, rows = 0.0, 0
    for b in range(s_rel.shape[0]):
        n = int(mask[b].sum())
        ps = torch.softmax(s_rel[b, :, :n, :n].double(), -1)
        pt = torch.softmax(t_rel[b, :, :n, :n].double(), -1)
        total = total + (pt * (pt.log() - ps.log())).sum()
        rows += s_rel.shape[1] * n
    return total / rows


def test_relation_logits_and_relation_kl_match_references():
    x, y = _randn(B, T, 8, seed=5), _randn(B, T, 8, seed=6)
    rel = relation_logits(x, y, heads=2)
    want = torch.einsum("bthd,bshd->bhts", x.reshape(B, T, 2, 4), y.reshape(B, T, 2, 4)) / 2.0
    close(rel, want)
    s_rel, t_rel, mask = relation_logits(x, heads=2), relation_logits(y, heads=2), _mask()
    close(relation_kl(s_rel, t_rel, mask=mask), _ref_relation_kl(s_rel, t_rel, mask))
    assert relation_kl(t_rel.clone(), t_rel, mask=mask).abs().item() < 1e-6
    with pytest.raises(ValueError, match="dividing the width"):
        relation_logits(x, heads=3)


def test_padded_keys_and_queries_do_not_matter():
    x, y, mask = _randn(B, T, 8, seed=7), _randn(B, T, 8, seed=8), _mask()
    s_rel, t_rel = relation_logits(x, heads=2), relation_logits(y, heads=2)
    x2 = x.clone()
    x2[~mask] = 1e3  # garbage at padded tokens
    s_bad = relation_logits(x2.requires_grad_(True), heads=2)
    got = relation_kl(s_bad, t_rel, mask=mask)
    close(got, relation_kl(s_rel, t_rel, mask=mask))
    got.backward()
    assert torch.isfinite(x2.grad).all() and (x2.grad[~mask] == 0).all()


def test_attention_mse_matches_reference():
    s_sc, t_sc, mask = _randn(B, 2, T, T, seed=9), _randn(B, 2, T, T, seed=10), _mask()
    total, rows = 0.0, 0
    for b in range(B):
        n = int(mask[b].sum())
        total += (s_sc[b, :, :n, :n].double() - t_sc[b, :, :n, :n].double()).square().mean(-1).sum()
        rows += 2 * n
    close(attention_mse(s_sc, t_sc, mask=mask), total / rows)
    assert attention_mse(t_sc, t_sc, mask=mask).item() == 0.0


# ------------------------------------------------------------------------------------------- objective modules


def _hidden_states(layers, width, seed):
    return [_randn(B, T, width, seed=seed + i) for i in range(layers + 1)]


def _qkv(layers, width, seed):
    return {i: tuple(_randn(B, T, width, seed=seed + 10 * i + k) for k in range(3)) for i in range(layers)}


@pytest.mark.parametrize("cls", [HiddenMSE, HiddenCosine, SquareHead])
def test_hidden_objectives_zero_for_a_copy_and_projection_learns(cls):
    obj = cls()
    obj.bind(ModelShape(layers=6, hidden=8, heads=2), ModelShape(layers=6, hidden=8, heads=2))
    assert not len(obj.projections) and obj.needs() == {"student": list(range(6)), "teacher": list(range(6))}
    teacher = _hidden_states(6, 8, seed=20)
    mask = _mask()
    assert obj([h.clone() for h in teacher], teacher, mask=mask).abs().item() < 1e-6
    assert obj(_hidden_states(6, 8, seed=40), teacher, mask=mask).item() > 0
    narrow = cls(layers="uniform")
    narrow.bind(ModelShape(layers=2, hidden=4, heads=2), ModelShape(layers=6, hidden=8, heads=2))
    assert narrow.pairs == [(0, 2), (1, 5)] and len(narrow.projections) == 2
    student = [h.requires_grad_(True) for h in _hidden_states(2, 4, seed=60)]
    loss = narrow(student, teacher, mask=mask)
    loss.backward()
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in narrow.projections)
    assert student[1].grad.abs().sum() > 0 and student[0].grad is None  # embeddings are not mapped
    assert set(narrow.state_dict()) == {"projections.0.weight", "projections.1.weight"}


def test_hidden_objective_layer_reduction_and_embeddings_pair():
    mse = HiddenMSE(layers=[[-1, -1], [1, 5]])
    mse.bind(ModelShape(2, 8, 2), ModelShape(6, 8, 2))
    s, t, mask = _hidden_states(2, 8, seed=1), _hidden_states(6, 8, seed=30), _mask()
    want = (hidden_mse(s[0], t[0], mask=mask) + hidden_mse(s[2], t[6], mask=mask)) / 2
    close(mse(s, t, mask=mask), want)
    head = SquareHead(layers=[[0, 2], [1, 5]])
    head.bind(ModelShape(2, 8, 2), ModelShape(6, 8, 2))
    close(head(s, t, mask=mask), squarehead(s[1], t[3], mask=mask) + squarehead(s[2], t[6], mask=mask))
    with pytest.raises(ValueError, match="project is false"):
        HiddenMSE(project=False).bind(ModelShape(2, 4, 2), ModelShape(6, 8, 2))


def test_minilm_attention_needs_equal_heads_and_matches_relation_kl():
    obj = MiniLMAttention()
    with pytest.raises(ValueError, match="equal head counts"):
        obj.bind(ModelShape(2, 8, 2), ModelShape(6, 8, 4))
    obj.bind(ModelShape(2, 8, 2), ModelShape(6, 16, 2))
    assert obj.needs() == {"student": [1], "teacher": [5]}
    s, t, mask = _qkv(2, 8, seed=1), _qkv(6, 16, seed=100), _mask()
    (qs, ks, vs), (qt, kt, vt) = s[1], t[5]
    want = (_ref_relation_kl(relation_logits(qs, ks, heads=2), relation_logits(qt, kt, heads=2), mask)
            + _ref_relation_kl(relation_logits(vs, heads=2), relation_logits(vt, heads=2), mask))
    close(obj(s, t, mask=mask), want)
    tokens = mask.sum()
    close(obj(s, t, mask=mask, reduction="sum") / tokens, want)
    copy = {1: tuple(x.clone() for x in t[5])}
    assert obj(copy, t, mask=mask).abs().item() < 1e-6


def test_minilm_relations_with_different_head_counts():
    obj = MiniLMRelations(relation_heads=4)
    obj.bind(ModelShape(layers=2, hidden=8, heads=2), ModelShape(layers=6, hidden=16, heads=8))
    s = {i: tuple(x.requires_grad_(True) for x in v) for i, v in _qkv(2, 8, seed=3).items()}
    t, mask = _qkv(6, 16, seed=200), _mask()
    got = obj(s, t, mask=mask)
    want = sum(_ref_relation_kl(relation_logits(s[1][k], heads=4), relation_logits(t[5][k], heads=4), mask)
               for k in range(3))
    close(got, want)
    got.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in s[1])
    same = MiniLMRelations()
    same.bind(ModelShape(6, 16, 8), ModelShape(6, 16, 8))
    assert same.relation_heads == 8 and same(t, t, mask=mask).abs().item() < 1e-6
    with pytest.raises(ValueError, match="must divide both widths"):
        MiniLMRelations(relation_heads=3).bind(ModelShape(2, 8, 2), ModelShape(6, 16, 8))
    with pytest.raises(ValueError, match="relations must be"):
        MiniLMRelations(relations=["qk"])


def test_attention_mse_objective_sums_mapped_layers():
    obj = AttentionMSE()
    obj.bind(ModelShape(2, 8, 2), ModelShape(4, 8, 2))
    assert obj.pairs == [(0, 1), (1, 3)]
    s, t, mask = _qkv(2, 8, seed=5), _qkv(4, 8, seed=300), _mask()
    want = sum(attention_mse(relation_logits(s[i][0], s[i][1], heads=2),
                             relation_logits(t[j][0], t[j][1], heads=2), mask=mask) for i, j in obj.pairs)
    close(obj(s, t, mask=mask), want)
    assert obj({0: t[1], 1: t[3]}, t, mask=mask).item() == 0.0  # the student holds the mapped teacher layers
    close(obj(s, t, mask=mask, reduction="sum") / mask.sum(), want)
    assert math.isfinite(want.item()) and want.item() > 0
