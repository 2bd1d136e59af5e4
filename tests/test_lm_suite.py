"""The held-out LM suite: its measures against hand-computed values on models whose logits are set by hand,
the runner on a tiny Llama, and `potstill eval --suite lm` (no real model's quality is tested here)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from potstill.data.lm_suite_sources import ChoiceItem, continuation_items, qa_items
from potstill.errors import UserError
from potstill.eval.lm_suite import (
    _Runner,
    choice_accuracy,
    perplexity_examples,
    rouge_l,
    run_lm_suite,
    score_choices,
    token_sums,
)

WORDS = ["<pad>", "<eos>", "<unk>", "a", "b", "c", "d", "the", "cat", "sat"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """One id per word of WORDS (anything else is <unk>), split on blanks: token ids are known by hand."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


class BiasLM(torch.nn.Module):
    """Next-token logits `bias` at every position, whatever the input."""

    def __init__(self, bias: list[float]) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor(bias))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.bias.expand(*input_ids.shape, -1)


def test_token_sums_on_hand_made_logits():
    ln3 = math.log(3)
    student = torch.tensor([[0.0, ln3], [ln3, 0.0]])   # p_s = (1/4, 3/4), (3/4, 1/4)
    teacher = torch.tensor([[ln3, 0.0], [ln3, 0.0]])   # p_t = (3/4, 1/4) twice
    sums = token_sums(student, teacher, torch.tensor([0, 1]))
    assert sums["tokens"] == 2
    assert sums["nll"] == pytest.approx(2 * math.log(4))
    assert sums["teacher_nll"] == pytest.approx(math.log(4 / 3) + math.log(4))
    # row 1: 3/4·ln 3 + 1/4·ln(1/3) = ln3 / 2; row 2: the same distributions
    assert sums["kl"] == pytest.approx(ln3 / 2)
    assert sums["agree"] == 1  # row 1 disagrees (1 vs 0), row 2 agrees
    assert set(token_sums(student, None, torch.tensor([0, 1]))) == {"nll", "tokens"}


def test_rouge_l_on_a_known_pair():
    # longest common subsequence "the cat on mat": 4 of 6 words on each side → F1 = 2/3
    assert rouge_l("the cat lay on a mat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("The cat!", "the cat") == pytest.approx(1.0)


def test_choice_accuracy_and_the_scorer_pick_the_most_likely_option():
    assert choice_accuracy([[0.1, 0.9], [0.5, 0.5], [-1.0, -2.0]], [1, 0, 1]) == pytest.approx(2 / 3)  # ties: first
    tok = word_tokenizer()
    bias = [0.0] * len(WORDS)
    bias[WORDS.index("c")] = math.log(4)   # "c" is 4× as likely as any other word
    model = BiasLM(bias)
    items = [ChoiceItem("the cat", ("a", "c c c c c", "b"), 1), ChoiceItem("sat", ("c", "d d d d"), 0)]
    sequences = [([7, 8, 3], 1), ([7, 8, 5, 5, 5, 5, 5], 5), ([7, 8, 4], 1), ([9, 5], 1), ([9, 6, 6, 6, 6], 4)]
    from potstill.eval.lm_suite import choice_sequences

    assert choice_sequences(tok, items, max_tokens=16) == sequences
    runner = _Runner(lambda m, ids, mask: m(ids), len(tok), 0, batch_size=2)
    z = math.log(len(WORDS) - 1 + 4)
    want = [-z, 5 * (math.log(4) - z), -z, math.log(4) - z, -4 * z]
    assert runner.option_logprobs(model, sequences) == pytest.approx(want)
    # item 1: "a" (−z = −ln 13) beats "c c c c c" (5·(ln 4 − ln 13) < −ln 13): wrong; per character (÷ 1 vs
    # ÷ 9) the five c's win
    # item 2: "c" beats "d d d d": right, both ways
    scores = score_choices(runner, model, items, sequences)
    assert scores == pytest.approx({"accuracy": 0.5, "accuracy_norm": 1.0, "chance": (1 / 3 + 1 / 2) / 2, "n": 2})


def test_perplexity_kl_and_agreement_of_bias_models_match_hand_values():
    tok = word_tokenizer()
    vocab = len(WORDS)
    teacher_bias = [0.0] * vocab
    teacher_bias[WORDS.index("the")] = 2.0
    student, teacher = BiasLM([0.0] * vocab), BiasLM(teacher_bias)
    result = run_lm_suite(student, teacher, tok, logits=lambda m, ids, mask: m(ids), sources=["fortunes"],
                          block_tokens=16, blocks_per_source=3, prompts_per_source=2, prompt_tokens=4,
                          new_tokens=3, choice_items=4, progress=False)
    got = result["student"]["sources"]["fortunes"]
    assert got["perplexity"] == pytest.approx(vocab)   # uniform student
    log_pt = torch.log_softmax(torch.tensor(teacher_bias), -1)
    assert got["kl_to_teacher"] == pytest.approx(float((log_pt.exp() * (log_pt + math.log(vocab))).sum()), rel=1e-5)
    assert got["top1_agreement"] == 0.0                # student's argmax is id 0 (ties), teacher's "the"
    from potstill.data.lm_suite_sources import source_texts

    examples = perplexity_examples(tok, source_texts("fortunes"), block_tokens=16, blocks=3)
    targets = [t for ex in examples for t in ex["targets"] if t != -100]
    assert result["sources"]["fortunes"]["tokens"] == len(targets) == 48
    teacher_ppl = math.exp(-sum(float(log_pt[t]) for t in targets) / len(targets))
    assert result["teacher"]["sources"]["fortunes"]["perplexity"] == pytest.approx(teacher_ppl, rel=1e-5)
    table = {(r["measure"], r["on"]): r for r in result["table"]}
    assert table[("perplexity", "fortunes")]["student"] == pytest.approx(vocab)
    assert table[("kl_to_teacher", "fortunes")]["teacher"] is None
    assert table[("choice chance", "chatterbot-qa")]["student"] == 0.25


def test_teacher_as_its_own_student_on_a_tiny_llama():
    """A model compared with itself: KL 0, agreement 1, the same continuations (ROUGE-L 1) and choices."""
    tok = word_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=64, initializer_range=0.5, pad_token_id=0,
                                         eos_token_id=1, bos_token_id=None))
    model.train()
    result = run_lm_suite(model, model, tok, sources=["lee", "newsgroups"], block_tokens=16, blocks_per_source=2,
                          prompts_per_source=2, prompt_tokens=4, new_tokens=4, choice_items=3, progress=False)
    assert model.training  # its mode is given back
    for name in ("lee", "newsgroups"):
        s, t = result["student"]["sources"][name], result["teacher"]["sources"][name]
        assert s["perplexity"] == pytest.approx(t["perplexity"], rel=1e-6)
        assert s["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6) and s["top1_agreement"] == 1.0
    assert result["student"]["generation"]["rougeL_vs_teacher"] == pytest.approx(1.0)
    assert result["student"]["multiple_choice"] == result["teacher"]["multiple_choice"]
    with pytest.raises(UserError, match="unknown LM suite source"):
        run_lm_suite(model, model, tok, sources=["bbc"], progress=False)


def test_choice_items_are_deterministic_and_hold_the_true_option():
    texts = [" ".join(f"w{i}x{j}" for j in range(60)) for i in range(10)]
    items = continuation_items(texts, n_items=5, context_words=40, option_words=12)
    assert items == continuation_items(texts, n_items=5, context_words=40, option_words=12)
    for i, item in enumerate(items):
        assert item.context.split()[-1] == f"w{i}x39" and len(item.options) == 4 and len(set(item.options)) == 4
        assert item.options[item.answer] == " ".join(f"w{i}x{j}" for j in range(40, 52))
    qa = qa_items(n_items=10)
    assert len(qa) == 10 and all(it.context.startswith("Question: ") and it.context.endswith("\nAnswer:") for it in qa)
    assert len({it.answer for it in qa}) > 1


def test_eval_suite_lm_refuses_another_task_in_one_line(tmp_path, capsys, digits_recipe):
    from conftest import write_yaml

    from potstill.cli import main

    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    write_yaml(run / "recipe.yaml", digits_recipe)
    assert main(["eval", str(run), "--suite", "lm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--suite lm scores causal language-model students" in err and "classification" in err
    assert "\n" not in err
    assert main(["eval", str(tmp_path / "nothing"), "--suite", "lm"]) == 2
    assert "not a finished causal_lm run" in capsys.readouterr().err


def test_eval_suite_lm_on_a_tiny_causal_lm_run(tmp_path, capsys):
    from test_causal_lm import SENTENCES, llama, make_tokenizer, recipe, write_jsonl

    from potstill.cli import main
    from potstill.train import run_recipe

    tok = make_tokenizer()
    teacher = tmp_path / "teacher"
    llama(len(tok), layers=2).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in SENTENCES])
    r = recipe(tmp_path, teacher, data, max_steps=1, student={"init": "layers_from_teacher", "layers": [1]})
    run_recipe(r)
    assert main(["eval", str(r.run_dir), "--suite", "lm"]) == 0
    out = json.loads((r.run_dir / "eval_lm.json").read_text())
    assert out["suite"] == "lm" and set(out["sources"]) == {"lee", "newsgroups", "fortunes"}
    assert {row["on"] for row in out["table"]} >= {"lee", "generation", "newsgroups-continuation", "chatterbot-qa"}
    assert out["student"]["sources"]["lee"]["kl_to_teacher"] > 0
    assert "LM suite" in capsys.readouterr().err  # the rich console writes to stderr
