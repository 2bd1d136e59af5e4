"""Cross-tokenizer alignment (potstill.data.token_alignment): byte offsets, spans, merged span probabilities,
vocabulary mapping; on hand-written tokenizations, and against TRL's GOLD alignment + merge."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

from potstill.data.token_alignment import (
    align_spans,
    byte_offsets,
    matched_ids,
    merge_spans,
    vocab_mapping,
)
from potstill.losses.uld import uld


def test_spans_close_where_both_sides_end_a_token():
    # "abcdef": a = ab|c|def, b = a|bc|d|ef → common borders at 3 and 6
    a = [(0, 2), (2, 3), (3, 6)]
    b = [(0, 1), (1, 3), (3, 4), (4, 6)]
    assert align_spans(a, b) == [(0, 2, 0, 2), (2, 3, 2, 4)]
    assert align_spans(b, a) == [(0, 2, 0, 2), (2, 4, 2, 3)]
    assert align_spans(a, a) == [(0, 1, 0, 1), (1, 2, 1, 2), (2, 3, 2, 3)]


def test_zero_width_end_tokens_pair_up_or_drop():
    a = [(0, 2), (2, 3), (3, 6), (6, 6)]  # + EOS
    b = [(0, 1), (1, 3), (3, 4), (4, 6), (6, 6)]
    assert align_spans(a, b) == [(0, 2, 0, 2), (2, 3, 2, 4), (3, 4, 4, 5)]
    assert align_spans(a, b[:-1]) == [(0, 2, 0, 2), (2, 3, 2, 4)]  # one EOS only: no counterpart, no span


def test_a_token_straddling_a_border_keeps_the_span_open():
    # a's tokens 1 and 2 both carry the char range of one emoji (bytes 1..5): no border inside it
    a = [(0, 1), (1, 5), (1, 5), (5, 6)]
    b = [(0, 1), (1, 3), (3, 6)]
    assert align_spans(a, b) == [(0, 1, 0, 1), (1, 4, 1, 3)]


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for piece in ("he", "Ġw"):
        vocab[piece] = len(vocab)
    merges = [("h", "e"), ("Ġ", "w")]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


def test_byte_offsets_of_a_byte_level_bpe_split_an_emoji_into_its_bytes():
    tok = _byte_level_tokenizer()
    ids, offsets = byte_offsets(tok, "he w😀")  # 😀 is 4 UTF-8 bytes, one token each here
    assert tok.convert_ids_to_tokens(ids)[:2] == ["he", "Ġw"]
    assert offsets == [(0, 2), (2, 4), (4, 5), (5, 6), (6, 7), (7, 8)]
    ids, offsets = byte_offsets(tok, "é")  # 2 bytes
    assert offsets == [(0, 1), (1, 2)]


def test_byte_offsets_of_a_char_level_tokenizer_count_bytes():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={"héllo": 0, "w": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    ids, offsets = byte_offsets(tok, "héllo w")
    assert ids == [0, 1] and offsets == [(0, 6), (7, 8)]  # é is 2 bytes; the space belongs to no token


def test_merge_spans_multiplies_the_later_token_probabilities():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.25, 0.25, 0.5]])
    logits = probs.log()
    # span 0: rows 0, 1 (later token 2 at row 1); span 1: rows 2, 3 (later token 0 at row 3)
    first, scale = merge_spans(logits, torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([2, 0]),
                               torch.tensor([0, 1]))
    torch.testing.assert_close(first, logits[[0, 2]])
    torch.testing.assert_close(scale, torch.tensor([math.log(0.5), math.log(0.25)]))
    # a one-token span gets no factor; three tokens multiply two probabilities
    _, scale = merge_spans(logits, torch.tensor([0, 3]), torch.tensor([1, 2]), torch.tensor([1, 2]),
                           torch.tensor([0, 0]))
    torch.testing.assert_close(scale, torch.tensor([math.log(0.3 * 0.8), 0.0]))
    # at T = 2 the factor is taken from the tempered distribution
    _, scale = merge_spans(logits, torch.tensor([0]), torch.tensor([1]), torch.tensor([2]), torch.tensor([0]),
                           temperature=2.0)
    tempered = torch.tensor([0.2, 0.3, 0.5]).sqrt()
    assert scale.item() == pytest.approx(math.log(tempered[2] / tempered.sum()), abs=1e-6)


def _fake_tokenizer(vocab: dict[str, int], special: list[str], byte_level: bool):
    backend = SimpleNamespace(pre_tokenizer="ByteLevel()" if byte_level else "Metaspace()", decoder=None)
    return SimpleNamespace(get_vocab=lambda: vocab, get_added_vocab=dict, all_special_tokens=special,
                           backend_tokenizer=backend)


def test_vocab_mapping_normalises_space_markers_and_byte_pieces():
    teacher = _fake_tokenizer({"<|endoftext|>": 0, "Ġthe": 5, "the": 6, "Ċ": 7, "Ã©": 8, "x": 9},
                              ["<|endoftext|>"], byte_level=True)
    student = _fake_tokenizer({"<s>": 0, "<|endoftext|>": 1, "▁the": 3, "the": 4, "<0x0A>": 5, "é": 6, "y": 7},
                              ["<s>", "<|endoftext|>"], byte_level=False)
    mapping = vocab_mapping(teacher, student)
    assert mapping == {0: 1, 5: 3, 6: 4, 7: 5, 8: 6}
    assert matched_ids(mapping).tolist() == [[0, 1], [5, 3], [6, 4], [7, 5], [8, 6]]
    assert matched_ids({}).shape == (0, 2)
    # the same text twice on one side: the lower id, so the map stays one to one
    twice = _fake_tokenizer({"Ġa": 2, "▁a": 1}, [], byte_level=False)  # not byte-level: Ġ is a plain char
    assert vocab_mapping(_fake_tokenizer({"▁a": 4, " a": 3}, [], byte_level=False), twice) == {3: 1}


def test_vocab_mapping_of_real_tokenizers_matches_the_shared_pieces():
    tok = _byte_level_tokenizer()
    mapping = vocab_mapping(tok, tok)
    assert len(mapping) == len(tok.get_vocab()) and all(k == v for k, v in mapping.items())


def test_aligned_uld_equals_trl_gold_extended_uld():
    """Alignment + merge + uld against TRL's ULDLoss (use_extended_uld, "observed" merge) on one sequence.

    TRL pairs logits row k with token k; giving it the targets as input ids makes that the next-token
    convention used here (row k predicts targets[k])."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    s_off = [(0, 2), (2, 3), (3, 6), (6, 7), (7, 9)]
    t_off = [(0, 1), (1, 3), (3, 4), (4, 6), (6, 9)]
    g = torch.Generator().manual_seed(0)
    s_logits, t_logits = torch.randn(1, 5, 7, generator=g) * 2, torch.randn(1, 5, 11, generator=g) * 2
    s_tok, t_tok = torch.randint(0, 7, (1, 5), generator=g), torch.randint(0, 11, (1, 5), generator=g)
    config = SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
        uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
        use_extended_uld=True, uld_token_merge_strategy="observed", uld_use_hybrid_loss=False,
        uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=0.5)
    want = gold.ULDLoss(config)(s_logits, t_logits, s_tok, t_tok, s_tok, t_tok,
                                student_byte_offsets=torch.tensor([s_off]), teacher_byte_offsets=torch.tensor([t_off]))

    spans = align_spans(s_off, t_off)
    assert spans == [(0, 2, 0, 2), (2, 3, 2, 4), (3, 5, 4, 5)]

    def side(logits, tokens, lo, hi):
        first = torch.tensor([sp[lo] for sp in spans])
        later = [(k, n) for n, sp in enumerate(spans) for k in range(sp[lo] + 1, sp[hi])]
        rows = torch.tensor([k for k, _ in later], dtype=torch.long)
        return merge_spans(logits[0], first, rows, tokens[0, rows], torch.tensor([n for _, n in later]))

    s_rows, s_scale = side(s_logits, s_tok, 0, 1)
    t_rows, t_scale = side(t_logits, t_tok, 2, 3)
    got = uld(s_rows, t_rows, student_log_scale=s_scale, teacher_log_scale=t_scale)
    torch.testing.assert_close(got, want.reshape(()), rtol=1e-5, atol=1e-6)
