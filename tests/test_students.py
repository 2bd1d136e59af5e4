"""Students built from tiny teachers (configs only, nothing downloaded)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from potstill.students import (
    from_config,
    layers_from_teacher,
    save_hf_student,
    save_sentence_transformer,
    shrink_report,
)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
    "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "big", "small", "red", "blue", ".",
    "##s", "##ed", "hello", "world", "is", "was",
]  # fmt: skip


def tiny_bert(**kw) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, **kw
    )
    return BertModel(config).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=100, n_embd=32, n_layer=4, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


TEACHERS = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}
STACK = {"bert": "encoder.layer", "llama": "model.layers", "gpt2": "transformer.h"}


def _get(model, dotted):
    for part in dotted.split("."):
        model = getattr(model, part)
    return model


def _inputs():
    ids = torch.tensor([[5, 6, 7, 8, 9, 2], [10, 11, 12, 13, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return ids, mask


def _out(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("kind", sorted(TEACHERS))
def test_layers_from_teacher_copies_chosen_layers(kind):
    teacher = TEACHERS[kind]()
    student = layers_from_teacher(teacher, [0, 3])
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == 2
    assert teacher.config.num_hidden_layers == 4
    assert student.training and student.dtype == teacher.dtype
    t_stack, s_stack = _get(teacher, STACK[kind]), _get(student, STACK[kind])
    assert len(s_stack) == 2
    for k, t_idx in enumerate([0, 3]):
        t_state, s_state = t_stack[t_idx].state_dict(), s_stack[k].state_dict()
        assert t_state.keys() == s_state.keys()
        for name in t_state:
            assert torch.equal(t_state[name], s_state[name]), (k, name)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    stack_prefix = STACK[kind] + "."
    others = [k for k in t_sd if not k.startswith(stack_prefix)]
    assert others, "expected embeddings/norm/head weights"
    for key in others:
        assert torch.equal(t_sd[key], s_sd[key]), key
    # no shared storage
    t_ptrs = {p.data_ptr() for p in teacher.parameters()}
    assert not any(p.data_ptr() in t_ptrs for p in student.parameters())
    before = teacher.get_input_embeddings().weight.clone()
    with torch.no_grad():
        student.get_input_embeddings().weight.add_(1.0)
        for p in s_stack.parameters():
            p.add_(1.0)
    assert torch.equal(teacher.get_input_embeddings().weight, before)
    # forward works
    ids, mask = _inputs()
    out = _out(student.eval(), ids, mask)
    assert out.shape[:2] == ids.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", sorted(TEACHERS))
def test_all_layers_reproduces_teacher(kind):
    teacher = TEACHERS[kind]()
    student = layers_from_teacher(teacher, [0, 1, 2, 3]).eval()
    ids, mask = _inputs()
    assert torch.equal(_out(teacher, ids, mask), _out(student, ids, mask))


def test_layers_from_teacher_keeps_global_rng_and_generation_config():
    teacher = tiny_gpt2()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    student = layers_from_teacher(teacher, [1])
    assert torch.equal(torch.rand(3), expected)
    assert student.generation_config.eos_token_id == teacher.generation_config.eos_token_id
    assert student.generation_config is not teacher.generation_config


def test_gpt2_student_keeps_tied_head():
    student = layers_from_teacher(tiny_gpt2(), [1, 2])
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()


def test_per_layer_config_lists_are_sliced():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
        use_sliding_window=True,
        sliding_window=8,
    )
    teacher = Qwen2ForCausalLM(config).eval()
    student = layers_from_teacher(teacher, [1, 2])
    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    assert teacher.config.layer_types[0] == "full_attention" and len(teacher.config.layer_types) == 4
    ids, mask = _inputs()
    assert torch.isfinite(_out(student.eval(), ids, mask)).all()


def test_bf16_teacher_gives_bf16_student():
    teacher = tiny_bert().to(torch.bfloat16)
    student = layers_from_teacher(teacher, [1, 3])
    assert student.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in student.parameters())


@pytest.mark.parametrize(
    ("layers", "match"),
    [
        ([], "empty"),
        ([0, 4], "out of range.*4 layers"),
        ([-1, 2], "out of range"),
        ([1, 1], "repeat"),
        ([2, 1], "increasing"),
        ([0, 1.5], "whole numbers"),
        ("01", "list"),
    ],
)
def test_bad_layer_indices(layers, match):
    with pytest.raises(ValueError, match=match):
        layers_from_teacher(tiny_bert(), layers)


def test_from_config_shapes_seed_and_rng():
    teacher = tiny_bert()
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    small = {"num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}
    a = from_config(teacher, **small)
    assert torch.equal(torch.rand(2), expected)  # global RNG restored
    b = from_config(teacher, **small)
    c = from_config(teacher, seed=1, **small)
    assert type(a) is BertModel and a.training
    assert len(a.encoder.layer) == 2
    assert a.embeddings.word_embeddings.weight.shape == (100, 16)
    assert a.encoder.layer[0].intermediate.dense.weight.shape == (32, 16)
    assert teacher.config.hidden_size == 32  # teacher untouched
    assert torch.equal(a.embeddings.word_embeddings.weight, b.embeddings.word_embeddings.weight)
    assert not torch.equal(a.embeddings.word_embeddings.weight, c.embeddings.word_embeddings.weight)
    ids, mask = _inputs()
    assert _out(a.eval(), ids, mask).shape == (2, 6, 16)


def test_from_config_with_config_and_llama_head_dim():
    model = from_config(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                   intermediate_size=64), num_hidden_layers=1)  # fmt: skip
    assert type(model) is BertModel and len(model.encoder.layer) == 1
    llama = from_config(tiny_llama(), hidden_size=16, num_attention_heads=2, num_hidden_layers=2)
    assert type(llama) is LlamaForCausalLM
    assert llama.config.head_dim == 8 and llama.config.num_key_value_heads == 2
    ids, mask = _inputs()
    assert _out(llama.eval(), ids, mask).shape == (2, 6, 100)
    gpt = from_config(tiny_gpt2(), n_layer=1)
    assert len(gpt.transformer.h) == 1


def test_from_config_unknown_override():
    with pytest.raises(ValueError, match=r"num_hiden_layers.*did you mean \"num_hidden_layers\""):
        from_config(tiny_bert(), num_hiden_layers=2)
    with pytest.raises(ValueError, match="unknown config field"):
        from_config(tiny_bert(), to_dict=1)


def test_shrink_report():
    teacher = tiny_bert()
    student = layers_from_teacher(teacher, [0, 2])
    report = shrink_report(teacher, student)
    assert report["teacher_params"] == sum(p.numel() for p in teacher.parameters())
    assert report["student_params"] < report["teacher_params"]
    assert report["ratio"] == pytest.approx(report["teacher_params"] / report["student_params"])
    assert report["teacher_layers"] == 4 and report["student_layers"] == 2


def _tokenizer(tmp_path) -> BertTokenizerFast:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)


def test_save_hf_student_reloads_equal(tmp_path):
    student = layers_from_teacher(tiny_bert(), [1, 3]).eval()
    out = save_hf_student(student, _tokenizer(tmp_path), tmp_path / "student")
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert (out / "tokenizer.json").exists() or (out / "vocab.txt").exists()
    reloaded = AutoModel.from_pretrained(out).eval()
    ids, mask = _inputs()
    assert torch.equal(_out(student, ids, mask), _out(reloaded, ids, mask))
    assert not list(tmp_path.glob(".student*"))  # no temp folders left behind

    gpt = layers_from_teacher(tiny_gpt2(), [0, 2]).eval()
    save_hf_student(gpt, None, tmp_path / "gpt")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt").eval()
    assert torch.equal(_out(gpt, ids, mask), _out(again, ids, mask))


def _mean_pool(model, tokenizer, sentences, cls=False):
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    if cls:
        return hidden[:, 0]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


SENTENCES = ["the cat sat on the mat .", "a big dog ran far away", "hello world"]


@pytest.mark.parametrize(("pooling", "normalize"), [("mean", False), ("cls", True)])
def test_save_sentence_transformer_loads_and_matches(tmp_path, pooling, normalize):
    from sentence_transformers import SentenceTransformer

    tokenizer = _tokenizer(tmp_path)
    student = layers_from_teacher(tiny_bert(max_position_embeddings=64), [0, 2]).eval()
    path = save_sentence_transformer(
        student, tokenizer, tmp_path / "st", pooling=pooling, normalize=normalize, max_seq_length=32
    )
    assert (path / "modules.json").exists()
    modules = json.loads((path / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == (
        ["Transformer", "Pooling", "Normalize"] if normalize else ["Transformer", "Pooling"]
    )
    loaded = SentenceTransformer(str(path), device="cpu")
    assert loaded.max_seq_length == 32
    got = loaded.encode(SENTENCES, convert_to_tensor=True)
    expected = _mean_pool(student, tokenizer, SENTENCES, cls=pooling == "cls")
    if normalize:
        expected = torch.nn.functional.normalize(expected, dim=-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_saved_sentence_transformer_loads_without_potstill(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    student = tiny_bert(max_position_embeddings=64)
    path = save_sentence_transformer(student, tokenizer, tmp_path / "st")
    expected = _mean_pool(student, tokenizer, SENTENCES)
    torch.save(expected, tmp_path / "expected.pt")
    code = (
        "import sys, torch\n"
        "from sentence_transformers import SentenceTransformer\n"
        f"m = SentenceTransformer({str(path)!r}, device='cpu')\n"
        f"got = m.encode({SENTENCES!r}, convert_to_tensor=True)\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)\n"
        "assert not any(name.startswith('potstill') for name in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=120)


def test_save_sentence_transformer_bad_pooling(tmp_path):
    with pytest.raises(ValueError, match='did you mean "mean"'):
        save_sentence_transformer(tiny_bert(), _tokenizer(tmp_path), tmp_path / "st", pooling="meen")


def test_distilbert_stack_is_found():
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=4, n_heads=2, hidden_dim=64)
    teacher = DistilBertModel(config).eval()
    student = layers_from_teacher(teacher, [1, 3])
    assert student.config.n_layers == 2 and len(student.transformer.layer) == 2
    for k, t_idx in enumerate([1, 3]):
        s_state = student.transformer.layer[k].state_dict()
        for name, value in teacher.transformer.layer[t_idx].state_dict().items():
            assert torch.equal(value, s_state[name])


def test_real_minilm_student_and_sentence_transformer(tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from potstill.assets import minilm_path

    teacher = AutoModel.from_pretrained(minilm_path()).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    student = layers_from_teacher(teacher, [0, 2, 4]).eval()
    assert len(student.encoder.layer) == 3
    query = student.encoder.layer[1].attention.self.query.weight
    assert torch.equal(query, teacher.encoder.layer[2].attention.self.query.weight)
    path = save_sentence_transformer(student, tokenizer, tmp_path / "st", normalize=True)
    sentences = ["A man is playing a guitar.", "The stock market fell sharply today."]
    got = SentenceTransformer(str(path), device="cpu").encode(sentences, convert_to_tensor=True)
    expected = torch.nn.functional.normalize(_mean_pool(student, tokenizer, sentences), dim=-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_set_dropout_makes_a_training_student_deterministic():
    from potstill.students.build import set_dropout

    student = layers_from_teacher(tiny_bert(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3), [0, 3])
    student.train()
    ids, mask = _inputs()
    assert not torch.equal(_out(student, ids, mask), _out(student, ids, mask))  # dropout is on
    assert set_dropout(student, 0.0) > 0
    train_out = _out(student, ids, mask)
    assert torch.equal(train_out, _out(student, ids, mask))
    assert torch.allclose(train_out, _out(student.eval(), ids, mask), atol=1e-6)
    assert student.config.hidden_dropout_prob == 0.0 and student.config.attention_probs_dropout_prob == 0.0


def test_set_dropout_reaches_llama_attention_and_config():
    from potstill.students.build import set_dropout

    student = layers_from_teacher(tiny_llama(), [0, 2])
    set_dropout(student, 0.25)
    rates = [m.attention_dropout for m in student.modules() if isinstance(getattr(m, "attention_dropout", None),
                                                                            float)]
    assert len(rates) == 2 and all(r == 0.25 for r in rates)
    assert student.config.attention_dropout == 0.25
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        set_dropout(student, 1.0)


def test_build_student_applies_the_recipe_dropout():
    from potstill.config import StudentConfig
    from potstill.students.loading import build_student

    teacher = tiny_bert()
    default = build_student(StudentConfig(layers=[0, 1]), teacher, seed=0)
    assert {m.p for m in default.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}  # the teacher's rate
    student = build_student(StudentConfig(layers=[0, 1], dropout=0.05), teacher, seed=0)
    assert {m.p for m in student.modules() if isinstance(m, torch.nn.Dropout)} == {0.05}
    assert {m.p for m in teacher.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}  # the teacher is untouched
    with pytest.raises(ValueError, match="swiftkv has no dropout"):
        StudentConfig(init="swiftkv", dropout=0.0)


def test_a_student_of_its_own_model_type_takes_the_recipe_dropout():
    from types import SimpleNamespace

    from potstill.config import StudentConfig
    from potstill.tasks.lm_models import build_text_student

    class Tokenizer:
        pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

        def __len__(self) -> int:
            return 50

    llama = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1}
    cfg = StudentConfig(init="from_config", config=llama, dropout=0.2)
    student = build_text_student(SimpleNamespace(student=cfg, seed=0), None, Tokenizer(), AutoModelForCausalLM)
    assert student.config.attention_dropout == 0.2
    assert [m.attention_dropout for m in student.modules() if hasattr(m, "attention_dropout")] == [0.2]
