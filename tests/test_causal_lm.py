"""The causal_lm task with tiny Llama / GPT-2 models and a byte-level BPE tokenizer trained here (no downloads)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from potstill.config import validate_recipe
from potstill.data.lm_records import pack, shift_targets
from potstill.errors import UserError
from potstill.losses import forward_kl
from potstill.students import layers_from_teacher
from potstill.tasks import build_task
from potstill.train import run_recipe

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "what is two plus two", "two plus two is four",
             "the bird sang a song in the tree", "my friend reads a book every night", "rain fell on the old roof"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer(sentences=SENTENCES, vocab_size=320, chat=True) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"])
    tk.train_from_iterator(sentences * 3, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def llama(vocab: int, layers: int = 2, seed: int = 0, init: float = 0.02, tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128, tie_word_embeddings=tied,
                                        initializer_range=init, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def gpt2(vocab: int, layers: int = 2, seed: int = 0, init: float = 0.02) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=2, n_positions=128,
                                      initializer_range=init, bos_token_id=1, eos_token_id=2))


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tok):
    """Saved teachers: a 3-layer Llama (tied embeddings, vocab padded to len(tok)+13) and a 3-layer GPT-2."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, model in (("llama", llama(len(tok) + 13, layers=3, init=0.3)), ("gpt2", gpt2(len(tok), 3, init=0.3))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def recipe(tmp_path, teacher, train, eval_=None, student=None, data=None, **trainer):
    return validate_recipe({
        "name": "lm", "output_dir": str(tmp_path / "runs"), "task": "causal_lm", "seed": 0,
        "teacher": {"path": str(teacher)} if not isinstance(teacher, dict) else teacher,
        "student": student or {"init": "layers_from_teacher", "layers": [0, 2]},
        "data": {"train": train, "eval": eval_, "max_length": 32, **(data or {})},
        "objectives": [{"name": "forward_kl", "params": {"chunk_size": 64}}],
        "trainer": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1, "num_threads": 1, **trainer},
        "eval": {"throughput": False, "compare_before": True}})


def setup_task(r):
    task = build_task(r, run_dir=r.run_dir)
    task.setup()
    return task


def counted_tokens(task, example) -> list[int]:
    return [t for t in example["targets"] if t != -100]


# ------------------------------------------------------------------------------------------ data formats


def test_prompt_completion_counts_only_completion_tokens(tmp_path, tok, folders):
    rows = [{"prompt": "what is two plus two", "completion": " four"}, {"prompt": "the cat", "completion": " sat"}]
    task = setup_task(recipe(tmp_path, folders["gpt2"], write_jsonl(tmp_path / "pc.jsonl", rows)))
    for row, ex in zip(rows, task.train_records, strict=True):
        prompt = tok(row["prompt"]).input_ids
        completion = tok(row["completion"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert ex["input_ids"] == prompt + completion
        # position j predicts token j+1: the prompt's last position predicts the first completion token
        assert ex["targets"] == [-100] * (len(prompt) - 1) + completion + [-100]
    batch = task.collate(task.train_records, [0, 1])
    assert task.count_rows(batch) == sum(len(counted_tokens(task, ex)) for ex in task.train_records)
    assert torch.equal(task.signal_mask(batch), batch["targets"] != -100)


def test_messages_count_only_assistant_turns(tmp_path, tok, folders):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two plus two"},
            {"role": "assistant", "content": "four"}, {"role": "user", "content": "and the cat"},
            {"role": "assistant", "content": "it sat on the mat"}]
    task = setup_task(recipe(tmp_path, folders["llama"], write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}]),
                             data={"max_length": 128}))
    ex = task.train_records[0]
    assert ex["input_ids"] == tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    counted = tok.decode(counted_tokens(task, ex))
    assert counted == "four<|im_end|>\nit sat on the mat<|im_end|>\n"
    # the tokens before each assistant turn (through "<|im_start|>assistant\n") are not targets
    first = ex["targets"].index(next(t for t in ex["targets"] if t != -100))
    assert tok.decode(ex["input_ids"][:first + 1]).endswith("<|im_start|>assistant\n")


def test_messages_need_a_chat_template(tmp_path, folders):
    plain = make_tokenizer(chat=False)
    folder = tmp_path / "plain"
    gpt2(len(plain), layers=3).save_pretrained(folder)
    plain.save_pretrained(folder)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    with pytest.raises(UserError, match="chat template"):
        setup_task(recipe(tmp_path, folder, write_jsonl(tmp_path / "c.jsonl", rows)))


def test_text_truncation_and_packing(tmp_path, tok, folders):
    rows = [{"text": s} for s in SENTENCES]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    plain = setup_task(recipe(tmp_path, folders["gpt2"], data, data={"max_length": 8}))
    for row, ex in zip(rows, plain.train_records, strict=True):
        ids = (tok(row["text"]).input_ids + [tok.eos_token_id])[:8]
        assert ex["input_ids"] == ids and ex["targets"] == ids[1:] + [-100]
    packed = setup_task(recipe(tmp_path, folders["gpt2"], data, data={"max_length": 8, "packing": True}))
    stream = [t for row in rows for t in tok(row["text"]).input_ids + [tok.eos_token_id]]
    blocks = packed.train_records
    assert len(blocks) == math.ceil((len(stream) - 1) / 8)
    assert all(len(b["input_ids"]) == 8 for b in blocks[:-1])
    assert [t for b in blocks for t in b["input_ids"]] == stream[:min(len(stream), 8 * len(blocks))]
    assert [t for b in blocks for t in b["targets"] if t != -100] == stream[1:]
    batch = packed.collate(blocks[-2:], [len(blocks) - 2, len(blocks) - 1])
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"][0].all()
    n_last = len(blocks[-1]["input_ids"])
    assert batch["attention_mask"][1].tolist() == [1] * n_last + [0] * (8 - n_last)
    assert (batch["targets"][1, n_last:] == -100).all()
    # helpers on their own
    assert shift_targets([5, 6, 7], [True, False, True]) == [-100, 7, -100]
    assert pack([([1, 2, 3], [True] * 3), ([4, 5], [True, True])], 2) == [
        {"input_ids": [1, 2], "targets": [2, 3]}, {"input_ids": [3, 4], "targets": [4, 5]}]


# ------------------------------------------------------------------------------------- vocab and tokenizers


def test_padded_vocab_is_cut_to_the_tokenizer(tmp_path, tok, folders):
    """Teacher predicts len(tok)+13 ids, student len(tok)+5: both are compared on the len(tok) real ids."""
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in SENTENCES])
    r = recipe(tmp_path, folders["llama"], data,
               student={"init": "from_config", "config": {"num_hidden_layers": 1, "vocab_size": len(tok) + 5}})
    task = setup_task(r)
    batch = task.collate(task.train_records[:3], [0, 1, 2])
    t, s = task.teacher_signal(batch), task.student_signal(task.student, batch)
    assert t.shape[-1] == s.shape[-1] == len(tok)
    raw_t = task.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    raw_s = task.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (raw_t.shape[-1], raw_s.shape[-1]) == (len(tok) + 13, len(tok) + 5)
    mask = task.signal_mask(batch)
    loss = forward_kl(s, t, mask=mask, reduction="sum")
    direct = forward_kl(raw_s[..., :len(tok)], raw_t[..., :len(tok)].detach(), mask=mask, reduction="sum")
    assert torch.isfinite(loss) and torch.allclose(loss, direct)
    ce = task.hard_label_loss(s, batch)
    direct_ce = torch.nn.functional.cross_entropy(raw_s[..., :len(tok)].flatten(0, 1), batch["targets"].flatten(),
                                                  reduction="sum")
    assert torch.allclose(ce, direct_ce)


def test_different_tokenizers_are_refused(tmp_path, folders):
    other = make_tokenizer(["completely different words here", "zebra quartz"], vocab_size=300)
    folder = tmp_path / "other"
    llama(len(other)).save_pretrained(folder)
    other.save_pretrained(folder)
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in SENTENCES])
    r = recipe(tmp_path, folders["llama"], data, student={"init": "pretrained", "path": str(folder)})
    with pytest.raises(UserError, match="cross-tokenizer distillation is not supported") as err:
        setup_task(r)
    assert str(folders["llama"]) in str(err.value) and str(folder) in str(err.value)


def test_layers_from_teacher_llama_tied_and_gpt2(folders):
    for name in ("llama", "gpt2"):
        teacher = AutoModelForCausalLM.from_pretrained(folders[name])
        student = layers_from_teacher(teacher, [0, 2])
        t_layers = teacher.model.layers if name == "llama" else teacher.transformer.h
        s_layers = student.model.layers if name == "llama" else student.transformer.h
        assert len(s_layers) == 2
        assert all(torch.equal(a, b) for a, b in zip(s_layers[1].state_dict().values(),
                                                     t_layers[2].state_dict().values(), strict=True))
        emb, head = student.get_input_embeddings().weight, student.get_output_embeddings().weight
        assert emb.data_ptr() == head.data_ptr()  # tied in teacher → tied in student
        assert torch.equal(head, teacher.get_output_embeddings().weight)


# ------------------------------------------------------------------------------------------ whole runs


def test_forward_kl_run_lowers_kl_and_saves_a_loadable_student(tmp_path, tok, folders):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"{a} and {b}"} for a in SENTENCES for b in SENTENCES])
    held = write_jsonl(tmp_path / "eval.jsonl", [{"text": s + " again"} for s in SENTENCES])
    r = recipe(tmp_path, folders["gpt2"], train, held, data={"packing": True, "max_length": 16},
               student={"init": "from_config", "config": {"n_layer": 1, "tie_word_embeddings": False}},
               max_steps=12, lr=1e-2, batch_size=8)
    summary = run_recipe(r)
    teacher, before, after = summary["table"]
    assert set(teacher) >= {"perplexity", "token_accuracy"} and "kl_to_teacher" not in teacher
    assert {"perplexity", "token_accuracy", "token_agreement", "kl_to_teacher"} <= set(after)
    assert after["kl_to_teacher"] < 0.7 * before["kl_to_teacher"]
    folder = r.run_dir / "student"
    student = AutoModelForCausalLM.from_pretrained(folder)
    loaded_tok = AutoTokenizer.from_pretrained(folder)
    assert student.config.n_layer == 1 and loaded_tok.get_vocab() == tok.get_vocab()
    ids = loaded_tok("the cat sat", return_tensors="pt")
    assert student(**ids).logits.shape == (1, ids["input_ids"].shape[1], len(tok))


def test_tied_student_run_checkpoints(tmp_path, folders):
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in SENTENCES])
    summary = run_recipe(recipe(tmp_path, folders["llama"], data, data, max_steps=1))
    assert AutoModelForCausalLM.from_pretrained(summary["student_dir"]).config.tie_word_embeddings
    # `potstill eval` reloads the saved (non-factory) student and scores it like the run did
    from potstill.evaluate import evaluate_run

    rows = evaluate_run(Path(summary["student_dir"]).parent)
    assert rows[1]["perplexity"] == pytest.approx(summary["table"][-1]["perplexity"], rel=1e-4)


def test_perplexity_matches_a_direct_computation(tmp_path, tok, folders):
    rows = [{"prompt": s.split(" ", 2)[0], "completion": " " + s.split(" ", 1)[1]} for s in SENTENCES]
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    task = setup_task(recipe(tmp_path, folders["llama"], data, data))
    metrics = task.evaluate(task.student)
    nll, n, agree = 0.0, 0, 0
    with torch.no_grad():
        for row in rows:
            prompt = tok(row["prompt"]).input_ids
            ids = prompt + tok(row["completion"], add_special_tokens=False).input_ids + [tok.eos_token_id]
            x = torch.tensor([ids])
            log_s = task.student.eval()(x).logits[0, :, :len(tok)].log_softmax(-1)
            log_t = task.teacher(x).logits[0, :, :len(tok)].log_softmax(-1)
            for j in range(len(prompt) - 1, len(ids) - 1):
                nll -= float(log_s[j, ids[j + 1]])
                agree += int(log_s[j].argmax() == log_t[j].argmax())
                n += 1
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert metrics["token_agreement"] == pytest.approx(agree / n)
    assert task.evaluate(task.teacher, role="teacher").keys() == {"perplexity", "token_accuracy"}


def test_factory_models_and_recipe_errors(tmp_path, tok, folders):
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in SENTENCES])
    base = recipe(tmp_path, folders["gpt2"], data).model_dump(mode="json")
    with pytest.raises(UserError, match='did you mean "packing"'):
        validate_recipe({**base, "data": {**base["data"], "pakcing": True}})
    with pytest.raises(UserError, match="teacher.tokenizer"):
        setup_task(validate_recipe({**base, "teacher": {"factory": "test_causal_lm:factory_lm"},
                                    "student": {"init": "factory", "factory": "test_causal_lm:factory_lm"}}))
    task = setup_task(validate_recipe({
        **base, "teacher": {"factory": "test_causal_lm:factory_lm", "tokenizer": str(folders["gpt2"])},
        "student": {"init": "factory", "factory": "test_causal_lm:factory_lm", "kwargs": {"seed": 1}}}))
    batch = task.collate(task.train_records[:2], [0, 1])
    assert task.student_signal(task.student, batch).shape == (*batch["input_ids"].shape, len(tok))
    with pytest.raises(UserError, match="cannot tell the data format"):
        setup_task(recipe(tmp_path, folders["gpt2"], write_jsonl(tmp_path / "x.jsonl", [{"body": "x"}])))


class TinyLM(torch.nn.Module):
    """A plain torch causal LM (bag of previous embeddings) that returns a logits tensor."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(vocab, 16)
        self.out = torch.nn.Linear(16, vocab + 3)  # padded output

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(input_ids).cumsum(1))


def factory_lm(seed: int = 0) -> TinyLM:
    return TinyLM(len(make_tokenizer()), seed)


@pytest.mark.slow
def test_smollm2_builtin_teacher_with_its_chat_template(tmp_path):
    """The real SmolLM2-135M-Instruct (converted once into the user cache, ~25 s the first time)."""
    from potstill.assets import smollm2_path

    folder = smollm2_path()
    assert smollm2_path() == folder and (folder / "potstill_source.json").exists()
    chat = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."}]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}])
    r = recipe(tmp_path, "builtin:smollm2", data, student={"init": "layers_from_teacher", "layers": [0, 29]},
               data={"max_length": 128})
    task = setup_task(r)
    assert task.vocab_size == 49152 and task.student.config.num_hidden_layers == 2
    ex = task.train_records[0]
    # the template adds a default system prompt; only the assistant's answer and its end of turn count
    assert task.tokenizer.decode(ex["input_ids"]).startswith("<|im_start|>system\n")
    assert task.tokenizer.decode(counted_tokens(task, ex)) == "Paris.<|im_end|>\n"
    batch = task.collate([ex], [0])
    assert task.teacher_signal(batch).shape == (1, len(ex["input_ids"]), 49152)


def test_domains_weighting_for_a_causal_lm(tmp_path, tok, folders):
    """data.domains (DDK) on the causal_lm task: per-domain perplexities on data.eval, weights with the floor."""
    rows = [{"text": s, "domain": "animals" if any(w in s for w in ("cat", "dog", "bird")) else "other"}
            for s in SENTENCES] * 4
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    eval_ = write_jsonl(tmp_path / "eval.jsonl", rows[:7])
    r = recipe(tmp_path, folders["llama"], train, eval_, data={"domains": {"every": 1}}, max_steps=3)
    run_recipe(r)
    history = json.loads((r.run_dir / "domain_weights.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    task = setup_task(r)
    for h in history[1:]:
        assert set(h["student_ppl"]) == {"animals", "other"} and min(h["weights"].values()) >= 0.25 - 1e-12
        assert sum(h["weights"].values()) == pytest.approx(1.0)
    # the recorded perplexity is exp(mean token NLL) of the teacher on that domain's held-out sequences
    animals = [i for i, rec in enumerate(rows[:7]) if rec["domain"] == "animals"]
    sums = task.token_stats(task.teacher, [task.eval_records[i] for i in animals])
    assert history[1]["teacher_ppl"]["animals"] == pytest.approx(math.exp(sums["nll"] / sums["tokens"]), rel=1e-5)
    with pytest.raises(UserError, match="data.domains"):
        recipe(tmp_path, folders["llama"], train, eval_, data={"domains": {}, "packing": True})


def test_seq_kd_from_a_text_only_endpoint_teacher(tmp_path, tok, monkeypatch):
    """teacher.endpoint + generation.seq_kd: the completions come from an OpenAI-compatible server (here a flaky
    local one), each asked once; a re-run is answered by the run's response cache."""
    from potstill.serve import FaultSettings, LocalServer, create_app

    torch.set_num_threads(1)
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    rows = [{"prompt": s.split()[0] + " " + s.split()[1], "completion": " ".join(s.split()[2:])} for s in SENTENCES]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    log = tmp_path / "requests.jsonl"
    app = create_app(llama(len(tok), layers=1, init=0.3).eval(), tok, model_name="tiny", request_log=log,
                     faults=FaultSettings(fail_rate=0.3, seed=4))
    monkeypatch.setenv("OPENAI_API_KEY", "")
    with LocalServer(app) as server:
        raw = {"name": "bb", "output_dir": str(tmp_path / "runs"), "task": "causal_lm",
               "teacher": {"endpoint": {"base_url": server.base_url, "model": "tiny", "concurrency": 2},
                           "tokenizer": str(tok_dir)},
               "student": {"init": "from_config", "config": {"model_type": "llama", "hidden_size": 32,
                                                             "intermediate_size": 64, "num_hidden_layers": 1,
                                                             "num_attention_heads": 4, "num_key_value_heads": 2}},
               "data": {"train": train, "eval": train, "max_length": 32},
               "generation": {"seq_kd": True, "max_new_tokens": 4, "temperature": 0.0},
               "trainer": {"max_steps": 2, "batch_size": 4, "hard_label_weight": 1.0, "num_threads": 1},
               "eval": {"throughput": False, "compare_before": False}}
        r = validate_recipe(raw)
        run_recipe(r)
        stored = json.loads((r.run_dir / "seq_kd_completions.json").read_text())
        ok = [x["body_sha256"] for x in map(json.loads, log.read_text().splitlines()) if x["status"] == 200]
        assert len(stored["completions"]) == len(rows) and len(ok) == len(set(ok)) == len(rows)
        # the text is tokenized again: a random model's stray byte tokens come back as U+FFFD (3 bytes), so more ids
        assert all(c for c in stored["completions"]) and "tiny at http" in stored["teacher"]
        (r.run_dir / "seq_kd_completions.json").unlink()
        run_recipe(r, overwrite=True)
        again = [x for x in map(json.loads, log.read_text().splitlines()) if x["status"] == 200]
        assert len(again) == len(rows)  # every answer came from the response cache
        assert json.loads((r.run_dir / "seq_kd_completions.json").read_text()) == stored
    raw["objectives"] = [{"name": "forward_kl"}]
    with pytest.raises(UserError, match="teacher.endpoint gives text"):
        validate_recipe(raw)
    raw["objectives"], raw["generation"] = [], {"seq_kd": False}
    with pytest.raises(UserError, match="generation.seq_kd: true"):
        validate_recipe(raw)


def test_teacher_folder_without_tokenizer_files_uses_teacher_tokenizer(tmp_path, tok, folders):
    """Regression (#16): a teacher folder holding only config + weights loads when teacher.tokenizer names a
    tokenizer folder; the teacher's folder is not asked for a tokenizer."""
    bare, tok_dir = tmp_path / "bare", tmp_path / "tokenizer"
    llama(len(tok), layers=2).save_pretrained(bare)
    tok.save_pretrained(tok_dir)
    assert not any(p.name.startswith("tokenizer") for p in bare.iterdir())
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in SENTENCES])
    task = setup_task(recipe(tmp_path, {"path": str(bare), "tokenizer": str(tok_dir)}, data,
                             student={"init": "layers_from_teacher", "layers": [0]}))
    assert task.tokenizer.get_vocab() == tok.get_vocab()
    batch = task.collate(task.train_records[:2], [0, 1])
    assert task.teacher_signal(batch).shape == (*batch["input_ids"].shape, len(tok))


def test_from_config_student_weights_follow_the_recipe_seed(tmp_path, tok, folders):
    """The shrunk student is drawn from the recipe's seed: seeds 0 and 1 differ, the same seed repeats."""
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in SENTENCES])

    def student_weights(seed: int) -> torch.Tensor:
        r = recipe(tmp_path, folders["llama"], data, student={"init": "from_config",
                                                              "config": {"num_hidden_layers": 1}})
        task = setup_task(r.model_copy(update={"seed": seed}))
        return task.student.get_input_embeddings().weight.detach().clone()

    first, again, other = student_weights(0), student_weights(0), student_weights(1)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
