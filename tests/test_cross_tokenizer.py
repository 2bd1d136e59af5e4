"""Cross-tokenizer causal_lm runs (potstill.tasks.cross_tokenizer, potstill.data.cross_tokenizer): paired
encoding of hand-written tokenizations, span batches, the SpanLogits signals against a direct computation,
refusals, and a whole tiny run with uld and gold."""

from __future__ import annotations

import math

import pytest
import torch
from test_causal_lm import SENTENCES, llama, make_tokenizer, recipe, setup_task, write_jsonl

from potstill.data.cross_tokenizer import PairedEncoder
from potstill.errors import UserError
from potstill.losses.uld import gold
from potstill.train import run_recipe


def _byte_tokenizer(merges: list[tuple[str, str]]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def pair():
    return _byte_tokenizer([("h", "e"), ("Ġ", "w")]), _byte_tokenizer([])  # student: he|Ġw, teacher: h|e|Ġ|w


def test_paired_example_spans_targets_and_bytes(pair):
    student, teacher = pair
    ex = PairedEncoder(student, teacher, max_length=32).example("he w")
    s_ids = student.convert_tokens_to_ids(["<bos>", "he", "Ġw", "<eos>"])
    t_ids = teacher.convert_tokens_to_ids(["<bos>", "h", "e", "Ġ", "w", "<eos>"])
    assert ex["input_ids"] == s_ids and ex["teacher_ids"] == t_ids
    assert ex["spans"] == [(1, 2, 1, 3), (2, 3, 3, 5), (3, 4, 5, 6)]
    assert ex["targets"] == s_ids[1:] + [-100] and ex["n_bytes"] == 4
    # cut at the last span that fits both sides: the teacher needs 5 tokens for "he w"
    short = PairedEncoder(student, teacher, max_length=4).example("he w")
    assert short["spans"] == [(1, 2, 1, 3)] and short["input_ids"] == s_ids[:2] and short["teacher_ids"] == t_ids[:3]
    assert short["targets"] == [s_ids[1], -100] and short["n_bytes"] == 2
    # prompt + completion: only the completion is a target (student "he", "Ġ" | "w"; teacher "h", "e", "Ġ" | "w")
    pc = PairedEncoder(student, teacher, max_length=32, add_eos=False).example("w", prompt_text="he ")
    assert pc["spans"] == [(3, 4, 4, 5)]
    assert pc["targets"] == [-100, -100, student.convert_tokens_to_ids("w"), -100] and pc["n_bytes"] == 1


def _task(tmp_path, objectives, student_tokenizer=None, **kw):
    teacher_tok = make_tokenizer(chat=False)
    student_tok = make_tokenizer(SENTENCES[::-1] + ["zebra quartz jumps"], vocab_size=290, chat=False)
    root = tmp_path / "models"
    llama(len(teacher_tok), layers=2, init=0.3).save_pretrained(root / "teacher")
    teacher_tok.save_pretrained(root / "teacher")
    student_tok.save_pretrained(root / "student_tok")
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": s} for s in SENTENCES])
    held = write_jsonl(tmp_path / "eval.jsonl", [{"text": s + " again"} for s in SENTENCES[:3]])
    r = recipe(tmp_path, root / "teacher", train, held,
               student={"init": "from_config", "tokenizer": student_tokenizer or str(root / "student_tok"),
                        "config": {"num_hidden_layers": 1}}, **kw)
    r = r.model_copy(update={"objectives": [type(r.objectives[0])(**o) for o in objectives]})
    return r, teacher_tok, student_tok


def test_signals_are_the_merged_spans_of_each_model(tmp_path):
    r, teacher_tok, student_tok = _task(tmp_path, [{"name": "uld"}])
    task = setup_task(r)
    assert task.cross is not None and len(task.tokenizer) == len(student_tok)
    assert task.student.config.vocab_size == len(student_tok)
    batch = task.to_device(task.collate(task.train_records[:2], [0, 1]))
    s_sig, t_sig = task.student_signal(task.student, batch), task.teacher_signal(batch)
    n_spans = sum(len(ex["spans"]) for ex in task.train_records[:2])
    assert task.count_rows(batch) == n_spans
    assert s_sig.logits.shape == (n_spans, len(student_tok)) and t_sig.logits.shape == (n_spans, len(teacher_tok))
    # span by span, from each model's own log-softmax
    s_logp = torch.log_softmax(task.logits(task.student, batch).float(), -1)
    t_logp = torch.log_softmax(task.teacher(input_ids=batch["teacher_input_ids"]).logits.float(), -1)
    n = 0
    for b, ex in enumerate(task.train_records[:2]):
        for a0, a1, c0, c1 in ex["spans"]:
            want_s = sum(s_logp[b, k - 1, ex["input_ids"][k]].item() for k in range(a0 + 1, a1))
            want_t = sum(t_logp[b, k - 1, ex["teacher_ids"][k]].item() for k in range(c0 + 1, c1))
            assert s_sig.log_scale[n].item() == pytest.approx(want_s, abs=1e-4)
            assert t_sig.log_scale[n].item() == pytest.approx(want_t, abs=1e-4)
            torch.testing.assert_close(t_sig.logits[n], task.teacher(input_ids=batch["teacher_input_ids"]).logits[
                b, c0 - 1], rtol=1e-4, atol=1e-4)
            n += 1
    # the matched ids pair the tokens both byte-level vocabularies share
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    assert {(t_vocab[p], s_vocab[p]) for p in ("Ġthe", "a", "<eos>")} <= set(map(tuple, t_sig.matched_ids.tolist()))
    from potstill.train.objective import Objective

    value = Objective.from_name("gold")(s_sig, t_sig, task.signal_mask(batch))
    want = gold(s_sig.logits, t_sig.logits, matched_ids=t_sig.matched_ids, student_log_scale=s_sig.log_scale,
                teacher_log_scale=t_sig.log_scale, reduction="sum")
    torch.testing.assert_close(value, want)
    with pytest.raises(UserError, match="uld, gold, first_token_kl"):
        Objective.from_name("forward_kl")(s_sig, t_sig, None)


def test_first_token_kl_reads_the_first_rows_with_the_vocabularies_map(tmp_path):
    from potstill.data.token_alignment import first_token_map
    from potstill.losses.first_token_kl import first_token_kl
    from potstill.train.objective import Objective

    r, teacher_tok, student_tok = _task(tmp_path, [{"name": "first_token_kl", "params": {"temperature": 2.0}}])
    task = setup_task(r)
    batch = task.to_device(task.collate(task.train_records[:2], [0, 1]))
    s_sig, t_sig = task.student_signal(task.student, batch), task.teacher_signal(batch)
    assert torch.equal(t_sig.first_token_of, first_token_map(teacher_tok, student_tok, len(teacher_tok)))
    value = Objective.from_name("first_token_kl", temperature=2.0)(s_sig, t_sig, task.signal_mask(batch))
    want = first_token_kl(s_sig.logits, t_sig.logits, first_token_of=t_sig.first_token_of, temperature=2.0,
                          reduction="sum")  # the unmerged first rows: no span factor
    torch.testing.assert_close(value, want)
    summary = run_recipe(r.model_copy(update={"trainer": r.trainer.model_copy(update={"max_steps": 8, "lr": 1e-2})}))
    _, before, after = summary["table"]
    assert after["bits_per_byte"] < before["bits_per_byte"]


def test_other_objectives_and_settings_are_refused(tmp_path):
    r, _, _ = _task(tmp_path, [{"name": "forward_kl"}])
    with pytest.raises(UserError, match="cross-tokenizer distillation is not supported by forward_kl") as err:
        setup_task(r)
    assert "uld / gold" in str(err.value) and "student.tokenizer" in str(err.value)
    r, _, _ = _task(tmp_path, [{"name": "uld"}], data={"packing": True})
    with pytest.raises(UserError, match="data.packing"):
        setup_task(r)
    r, _, _ = _task(tmp_path, [{"name": "uld", "params": {"temperature": 2.0}}, {"name": "gold"}])
    with pytest.raises(UserError, match="share temperature"):
        setup_task(r)


def test_a_tiny_cross_tokenizer_run_lowers_uld_and_reports_bits_per_byte(tmp_path):
    r, _, student_tok = _task(tmp_path, [{"name": "uld"}, {"name": "gold", "weight": 0.5}],
                              max_steps=8, lr=1e-2, hard_label_weight=0.1)
    summary = run_recipe(r)
    teacher, before, after = summary["table"]
    for row in (teacher, before, after):
        assert row["bits_per_byte"] > 0 and math.isfinite(row["bits_per_byte"])
    assert after["bits_per_byte"] < before["bits_per_byte"]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(r.run_dir / "student").get_vocab() == student_tok.get_vocab()
    # `potstill eval` reloads the saved student (with its own tokenizer) and scores it like the run did
    from potstill.evaluate import evaluate_run

    rows = evaluate_run(r.run_dir)
    assert rows[1]["bits_per_byte"] == pytest.approx(after["bits_per_byte"], rel=1e-4)
    assert rows[0]["bits_per_byte"] == pytest.approx(teacher["bits_per_byte"], rel=1e-4)


def test_a_bpe_student_tokenizer_is_trained_once_on_the_training_text(tmp_path):
    r, teacher_tok, _ = _task(tmp_path, [{"name": "uld"}], student_tokenizer="bpe:300")
    task = setup_task(r)
    folder = r.run_dir / "student_tokenizer"
    assert len(task.tokenizer) == 300 and task.tokenizer.get_vocab() != teacher_tok.get_vocab()
    assert task.tokenizer.bos_token == "<s>" and task.student.config.vocab_size == 300
    # merges were learnt on the training text: its sentences take fewer tokens than bytes, "the" is one token
    assert all(len(task.tokenizer(s, add_special_tokens=False)["input_ids"]) < len(s) for s in SENTENCES)
    assert task.tokenizer.convert_tokens_to_ids("Ġthe") != task.tokenizer.unk_token_id
    stamp = (folder / "tokenizer.json").stat().st_mtime_ns
    assert setup_task(r).tokenizer.get_vocab() == task.tokenizer.get_vocab()
    assert (folder / "tokenizer.json").stat().st_mtime_ns == stamp  # reused, not trained again
    r, _, _ = _task(tmp_path, [{"name": "uld"}], student_tokenizer="bpe:12")
    with pytest.raises(UserError, match="student.tokenizer.*bpe:<vocabulary size>"):
        setup_task(r)
