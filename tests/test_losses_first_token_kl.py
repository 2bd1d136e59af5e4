"""first_token_kl (potstill.losses.first_token_kl) and its map (potstill.data.token_alignment.first_token_map):
the map on hand tokenizers, the loss by hand and against a float64 computation, its top-k form against the dense
form on the spread teacher vector, and the task feeding it through `potstill run`'s objective dispatch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from potstill.data.token_alignment import first_token_map
from potstill.losses.first_token_kl import first_token_kl, first_token_kl_topk, project_to_first_tokens
from potstill.losses.sparse import TopKTeacher
from potstill.losses.uld_topk import spread_tail


def _tokenizer(vocab: dict[str, int], special: list[str]):
    backend = SimpleNamespace(pre_tokenizer="ByteLevel()", decoder=None)
    return SimpleNamespace(get_vocab=lambda: vocab, get_added_vocab=dict, all_special_tokens=special,
                           backend_tokenizer=backend)


def test_first_token_map_takes_the_longest_student_prefix():
    # teacher: " understanding" (one token), " under", " un", "<eos>", "<pad>" (the student has no <pad>)
    teacher = _tokenizer({"<eos>": 0, "Ġunderstanding": 1, "Ġunder": 2, "Ġun": 3, "<pad>": 4, "x": 5}, ["<eos>",
                                                                                                      "<pad>"])
    student = _tokenizer({"<eos>": 0, "Ġ": 1, "u": 2, "Ġun": 3, "Ġunder": 4, "stand": 5, "x": 6}, ["<eos>"])
    assert first_token_map(teacher, student).tolist() == [0, 4, 4, 3, -1, 6]
    assert first_token_map(teacher, student, teacher_vocab=8).tolist() == [0, 4, 4, 3, -1, 6, -1, -1]


def test_first_token_map_of_smollm2_and_a_bpe(tmp_path):
    from transformers import AutoTokenizer

    from potstill.assets import smollm2_path
    from potstill.students.tokenizer import train_byte_level_bpe

    teacher = AutoTokenizer.from_pretrained(smollm2_path())
    texts = ["the understanding of the under-secretary was unusual"] * 20 + ["a b c d e f g h"] * 5
    student = train_byte_level_bpe(texts, 300, tmp_path / "bpe")
    pi = first_token_map(teacher, student, len(teacher))
    assert pi.shape == (len(teacher),) and int((pi < 0).sum()) <= len(teacher.get_added_vocab())  # specials only
    s_pieces = student.convert_ids_to_tokens(list(range(len(student))))
    for word in ("Ġunderstanding", "Ġthe", "Ġunusual"):
        t_id = teacher.convert_tokens_to_ids(word)
        s_piece = s_pieces[int(pi[t_id])]
        assert word.startswith(s_piece) and len(s_piece) > 1  # a real prefix, longer than one byte
        assert not any(word.startswith(p) and len(p) > len(s_piece) for p in s_pieces)  # the longest


def test_first_token_kl_by_hand():
    # teacher over 4 ids: .5 " understanding", .2 " under", .2 " un", .1 "<pad>" (dropped); π → student 0, 0, 1, -1
    teacher = torch.tensor([[0.5, 0.2, 0.2, 0.1]]).log()
    student = torch.tensor([[0.6, 0.3, 0.1]]).log()
    pi = torch.tensor([0, 0, 1, -1])
    q = project_to_first_tokens(teacher.exp(), pi, 3)
    torch.testing.assert_close(q, torch.tensor([[0.7, 0.2, 0.0]]))
    want = 0.7 * math.log(0.7 / 0.6) + 0.2 * math.log(0.2 / 0.3)
    assert first_token_kl(student, teacher, first_token_of=pi).item() == pytest.approx(want, abs=1e-6)
    # q itself as the student: 0 wherever the dropped mass is (q sums to .9, the student to 1)
    matched = torch.tensor([[0.7, 0.2, 0.1]]).log()
    assert first_token_kl(matched, teacher, first_token_of=pi).item() == pytest.approx(0.9 * 0 + 0.2 * 0, abs=1e-6)


def test_first_token_kl_against_float64_with_temperatures_mask_and_chunks():
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(2, 5, 7, generator=g) * 2).requires_grad_()
    teacher = torch.randn(2, 5, 11, generator=g) * 3
    pi = torch.randint(-1, 7, (11,), generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.3
    value = first_token_kl(student, teacher, first_token_of=pi, temperature=2.0, teacher_temperature=0.5, mask=mask)
    p_t = torch.softmax(teacher.double() / 0.5, -1)
    q = torch.zeros(2, 5, 8, dtype=torch.float64).index_add_(2, torch.where(pi < 0, 7, pi), p_t)[..., :7]
    log_s = torch.log_softmax(student.double() / 2.0, -1)
    rows = (torch.xlogy(q, q) - q * log_s).sum(-1)
    want = rows[mask].mean()
    torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(value, student)
    (want_grad,) = torch.autograd.grad(want, student)
    torch.testing.assert_close(grad.double(), want_grad.double(), rtol=1e-4, atol=1e-6)
    chunked = first_token_kl(student, teacher, first_token_of=pi, temperature=2.0, teacher_temperature=0.5,
                             mask=mask, chunk_size=3)
    torch.testing.assert_close(chunked, value)


@pytest.mark.parametrize("k", [3, 11])
def test_top_k_form_equals_the_dense_form_on_the_spread_teacher(k):
    g = torch.Generator().manual_seed(k)
    student = (torch.randn(6, 7, generator=g) * 2).requires_grad_()
    full = torch.log_softmax(torch.randn(6, 11, generator=g) * 3, -1)
    top = full.topk(k, -1)
    tail = full.scatter(1, top.indices, -math.inf).logsumexp(-1)
    pi = torch.randint(-1, 7, (11,), generator=g)
    cached = first_token_kl_topk(student, TopKTeacher(top.indices, top.values, tail), teacher_vocab=11,
                                 first_token_of=pi, temperature=1.5)
    dense_teacher = spread_tail(top.indices, top.values, tail, 11)
    dense = first_token_kl(student, dense_teacher, first_token_of=pi, temperature=1.5, teacher_temperature=1.0)
    torch.testing.assert_close(cached, dense, rtol=1e-5, atol=1e-6)
    grads = [torch.autograd.grad(v, student)[0] for v in (cached, dense)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    if k == 11:  # the live teacher
        live = first_token_kl(student, full, first_token_of=pi, temperature=1.5, teacher_temperature=1.0)
        torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-6)


def test_bad_maps_are_refused():
    s, t = torch.zeros(2, 3), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="teacher's vocabulary size 4"):
        first_token_kl(s, t, first_token_of=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="within the student's vocabulary of 3"):
        first_token_kl(s, t, first_token_of=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="integer"):
        first_token_kl(s, t, first_token_of=torch.zeros(4))
