"""BiAlign (potstill.losses.bialign, potstill.data.icl_demos) against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from potstill.data.icl_demos import (
    Demo,
    DemoSetCollator,
    ICLQuery,
    PromptTemplate,
    build_prompt,
    icl_queries,
    sample_demo_sets,
)
from potstill.errors import UserError
from potstill.losses import OBJECTIVES, forward_kl
from potstill.losses.bialign import bialign, demo_set_scores, input_preference_rank

pytestmark = pytest.mark.usefixtures("one_thread")

LN3 = math.log(3.0)


# --- the ranking loss ------------------------------------------------------------------------------------


def test_rank_is_zero_when_the_student_follows_the_teacher_with_the_margins() -> None:
    teacher = torch.tensor([[3.0, 1.0, 2.0]])  # order: set 0, set 2, set 1
    student = torch.tensor([[0.0, -0.2, -0.1]])  # the same order, 0.1 apart per rank
    assert input_preference_rank(student, teacher, margin=0.1).item() == pytest.approx(0.0, abs=1e-7)
    # a larger margin than the gaps: (0,1): −0.1 + 0.15, (0,2): −0.2 + 0.3, (1,2): −0.1 + 0.15
    assert input_preference_rank(student, teacher, margin=0.15).item() == pytest.approx(0.2, abs=1e-6)


def test_rank_hand_computed_on_a_reversed_order() -> None:
    teacher = torch.tensor([[3.0, 2.0, 1.0]])
    student = torch.tensor([[-2.0, -1.0, 0.0]])
    # pairs (a, b): (0,1) −1+2+0.5 = 1.5, (0,2) 0+2+1 = 3, (1,2) 0+1+0.5 = 1.5
    assert input_preference_rank(student, teacher, margin=0.5).item() == pytest.approx(6.0)


def test_rank_reductions() -> None:
    teacher = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    student = torch.tensor([[-2.0, -1.0, 0.0], [-2.0, -1.0, 0.0]])  # query 1 follows its teacher exactly
    per_query = input_preference_rank(student, teacher, margin=0.5, reduction="none")
    assert per_query.tolist() == pytest.approx([6.0, 0.0])
    assert input_preference_rank(student, teacher, margin=0.5, reduction="sum").item() == pytest.approx(6.0)
    assert input_preference_rank(student, teacher, margin=0.5).item() == pytest.approx(3.0)


def test_rank_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match="one shape"):
        input_preference_rank(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="margin"):
        input_preference_rank(torch.zeros(1, 2), torch.zeros(1, 2), margin=-1.0)


# --- scores and the total loss -------------------------------------------------------------------------


def test_demo_set_scores_are_length_normalised() -> None:
    logits = torch.tensor([[[0.0, 0.0], [LN3, 0.0], [0.0, 0.0]]])  # p(0) = 1/2, 3/4, 1/2 at positions 0, 1, 2
    labels = torch.tensor([[-100, 0, 0]])  # two counted tokens: ln(3/4) and ln(1/2)
    assert demo_set_scores(logits, labels).item() == pytest.approx((math.log(0.75) + math.log(0.5)) / 2)


def _one_query_two_sets() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vocabulary 2, one scored token (id 0) per row. Student: p(0) = 3/4 after set 0, 1/2 after set 1;
    teacher: 1/2 after set 0, 3/4 after set 1 (it prefers set 1)."""
    junk = [4.0, -1.0]
    student = torch.tensor([[junk, [LN3, 0.0]], [junk, [0.0, 0.0]]])
    teacher = torch.tensor([[junk, [0.0, 0.0]], [junk, [LN3, 0.0]]])
    labels = torch.tensor([[-100, 0], [-100, 0]])
    return student, teacher, labels


def test_bialign_hand_computed() -> None:
    student, teacher, labels = _one_query_two_sets()
    # KD per token: KL([1/2, 1/2] ‖ [3/4, 1/4]) = ½ ln(4/3);  KL([3/4, 1/4] ‖ [1/2, 1/2]) = ¾ ln(3/2) − ¼ ln 2
    kd = (0.5 * math.log(4 / 3) + 0.75 * math.log(1.5) - 0.25 * math.log(2)) / 2
    # teacher order: set 1, set 0; hinge = s_0 − s_1 + λ = ln(3/4) − ln(1/2) + 0.1
    rank = math.log(1.5) + 0.1
    got = bialign(student, teacher, labels=labels, num_sets=2, margin=0.1, rank_weight=2.0)
    assert got.item() == pytest.approx(kd + 2.0 * rank, rel=1e-5)
    none = bialign(student, teacher, labels=labels, num_sets=2, margin=0.1, rank_weight=2.0, reduction="none")
    assert none.tolist() == pytest.approx([2 * kd + 2.0 * rank], rel=1e-5)


def test_bialign_without_rank_is_token_kd() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 5, 7, generator=g), torch.randn(6, 5, 7, generator=g)
    labels = torch.randint(0, 7, (6, 5), generator=g)
    labels[:, :2] = -100
    got = bialign(student, teacher, labels=labels, num_sets=3, rank_weight=0.0)
    assert torch.allclose(got, forward_kl(student, teacher, labels=labels))


def test_gradient_flows_through_the_student_only() -> None:
    student, teacher, labels = _one_query_two_sets()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    bialign(student, teacher, labels=labels, num_sets=2, margin=0.1).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad[:, 1].abs().sum() > 0
    assert student.grad[:, 0].abs().sum() == 0  # prompt positions are not scored
    # the rank term alone pushes set 1's score up and set 0's down
    s = torch.tensor([[math.log(0.75), math.log(0.5)]], requires_grad=True)
    input_preference_rank(s, torch.tensor([[0.0, 1.0]]), margin=0.1).backward()
    assert s.grad.tolist() == [[1.0, -1.0]]


def test_bialign_checks_its_batch() -> None:
    student, teacher, labels = _one_query_two_sets()
    with pytest.raises(ValueError, match="multiple"):
        bialign(student, teacher, labels=labels, num_sets=3)
    with pytest.raises(ValueError, match="num_sets"):
        bialign(student, teacher, labels=labels, num_sets=1)


def test_catalogue_entry() -> None:
    info = OBJECTIVES["bialign"]
    assert info.kind == "demo_sets" and info.fn is bialign
    # num_sets and teacher_scores come from the data (data.icl.num_sets, the teacher pass), not from a recipe
    assert info.defaults == {"margin": 0.01, "rank_weight": 1.0, "temperature": 1.0, "reduction": "mean"}


# --- demonstration sets and the collator ----------------------------------------------------------------

WORDS = {w: i + 1 for i, w in enumerate("a b c d x y z q".split())}


def _encode(text: str) -> list[int]:
    return [WORDS[w] for w in text.split()]


def _query() -> ICLQuery:
    return ICLQuery("q", "z", (Demo("a", "x"), Demo("b", "y"), Demo("c", "z"), Demo("d", "x")))


def test_sample_demo_sets_is_seeded_and_distinct() -> None:
    sets = sample_demo_sets(4, num_sets=6, shots=2, seed=3)
    assert sets == sample_demo_sets(4, num_sets=6, shots=2, seed=3)
    assert len({frozenset(s) for s in sets}) == 6  # all C(4, 2) = 6 sets, each once
    assert all(len(set(s)) == 2 for s in sets)
    assert len(sample_demo_sets(3, num_sets=5, shots=3, seed=0)) == 5  # one possible set: repeats allowed
    with pytest.raises(UserError, match="pool of 2"):
        sample_demo_sets(2, num_sets=2, shots=3, seed=0)


def test_build_prompt() -> None:
    template = PromptTemplate(demo="{input} -> {output}", query="{input} ->", separator=" ; ")
    assert build_prompt([Demo("a", "x"), Demo("b", "y")], "q", template) == "a -> x ; b -> y ; q ->"


def test_collator_rows_and_targets() -> None:
    collate = DemoSetCollator(_encode, num_sets=2, shots=2, seed=5)
    batch = collate([_query(), _query()], [0, 1])
    assert batch["input_ids"].shape == (4, 6)  # 2 records × 2 sets; 2 demos (4 words) + query + target
    assert batch["demo_sets"].shape == (2, 2, 2)
    for row in range(4):
        sets = batch["demo_sets"][row // 2, row % 2].tolist()
        pool = _query().pool
        words = [w for j in sets for w in (pool[j].input, pool[j].output)] + ["q", "z"]
        assert batch["input_ids"][row].tolist() == _encode(" ".join(words))
        assert batch["targets"][row].tolist() == [-100] * 4 + [WORDS["z"], -100]
    assert batch["attention_mask"].all()
    again = collate([_query(), _query()], [0, 1])
    assert torch.equal(again["input_ids"], batch["input_ids"])  # same draw for the same (seed, index)


def test_icl_queries_refuse_malformed_records() -> None:
    good = {"query": "q", "target": "z", "pool": [{"input": "a", "output": "x"}]}
    assert icl_queries([good]) == [ICLQuery("q", "z", (Demo("a", "x"),))]
    with pytest.raises(UserError, match=r"data.train, record 1: give either 'pool' .* or 'demo_sets' .* not neither"):
        icl_queries([good, {"query": "q", "target": "z"}], "data.train")
    with pytest.raises(UserError, match=r"record 0: give either .* not both"):
        icl_queries([{**good, "demo_sets": [[{"input": "a", "output": "x"}]]}])
    with pytest.raises(UserError, match=r"pool\[0\]"):
        icl_queries([{**good, "pool": [{"input": "a"}]}])
    with pytest.raises(UserError, match=r"record 0: 'demo_sets' must be a list of 2 .* got 1"):
        icl_queries([{"query": "q", "target": "z", "demo_sets": [[{"input": "a", "output": "x"}]]}], num_sets=2)


def test_given_demo_sets_share_one_pool_and_are_kept_as_given() -> None:
    a, b, c = ({"input": i, "output": o} for i, o in (("a", "x"), ("b", "y"), ("c", "x")))
    (query,) = icl_queries([{"query": "q", "target": "z", "demo_sets": [[a, b], [c], [b, a]]}], num_sets=3)
    assert query.pool == (Demo("a", "x"), Demo("b", "y"), Demo("c", "x"))
    assert query.sets == ((0, 1), (2,), (1, 0))
    collate = DemoSetCollator(lambda s: [WORDS[w] for w in s.split()], num_sets=3, shots=9, seed=0)
    assert collate.variants(query, 7) == [("a x b y q", " z"), ("c x q", " z"), ("b y a x q", " z")]
    batch = collate([query], [7])
    assert batch["demo_sets"].tolist() == [[[0, 1], [2, -1], [1, 0]]]  # -1 after a shorter set
