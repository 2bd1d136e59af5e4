"""Shared fixtures: small, fast recipes built from the bundled digits MLPs (no downloads)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
POTSTILL = [sys.executable, "-m", "potstill"]

DIGITS = {
    "name": "digits-test",
    "task": "classification",
    "seed": 0,
    "teacher": {"factory": "potstill.examples.digits:trained_teacher", "kwargs": {"hidden": 64, "epochs": 5}},
    "student": {"init": "factory", "factory": "potstill.examples.digits:mlp", "kwargs": {"hidden": 16}},
    "data": {"train": {"path": "builtin:digits", "split": "train", "limit": 256},
             "eval": {"path": "builtin:digits", "split": "test"}},
    "objectives": [{"name": "forward_kl", "params": {"temperature": 4.0, "scale_t2": True}}],
    "trainer": {"max_steps": 10, "batch_size": 8, "lr": 1e-2, "weight_decay": 0.0, "log_every": 1,
                "num_threads": 1},
    "eval": {"compare_before": False, "throughput": False},
}


@pytest.fixture
def digits_recipe(tmp_path: Path) -> dict:
    """A tiny classification recipe (dict) writing into tmp_path."""
    raw = copy.deepcopy(DIGITS)
    raw["output_dir"] = str(tmp_path / "runs")
    return raw


def tiny_bert_encoder(folder: Path, num_hidden_layers: int, *, hidden_size: int = 32, seed: int = 0) -> Path:
    """A seeded BERT encoder, 32 wide unless `hidden_size` says otherwise, with MiniLM's tokenizer, saved in
    `folder` (a teacher for embedding runs)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from potstill.assets import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def embedding_recipe(tmp_path: Path, teacher: Path, train: Path, *, name: str, student: dict, objectives: list,
                     eval_data: Path | None = None, **trainer) -> dict:
    """A tiny embedding recipe (dict) into tmp_path/runs: 16-token texts, batch 8, one thread, no throughput or
    "before" row; `trainer` adds or overrides trainer fields (max_steps, lr, ...)."""
    data = {"train": str(train), **({"eval": str(eval_data)} if eval_data else {}), "max_length": 16}
    return {"name": name, "output_dir": str(tmp_path / "runs"), "task": "embedding", "teacher": {"path": str(teacher)},
            "student": student, "data": data, "objectives": objectives,
            "trainer": {"batch_size": 8, "num_threads": 1, **trainer},
            "eval": {"throughput": False, "compare_before": False}}


def numbered_texts_jsonl(path: Path, texts: list[str]) -> Path:
    """`texts` as JSONL records {"text": "<text> (<i>)"}, so that repeated texts stay distinct."""
    import json

    path.write_text("".join(json.dumps({"text": f"{t} ({i})"}) + "\n" for i, t in enumerate(texts)))
    return path


def write_yaml(path: Path, raw: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: threads only add contention on a loaded machine (use with pytest.mark.usefixtures)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def accelerate_launch(cwd: Path, recipe: Path, *flags: str, port: int | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch --num_processes 2 ... -m potstill run RECIPE` (gloo on CPU), output captured."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", *flags,
           *(["--main_process_port", str(port)] if port else []), "-m", "potstill", "run", str(recipe)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def load_benchmark(name: str):
    """Import `benchmarks/<name>.py` as a module (benchmarks/ is not a package; its scripts import each other)."""
    import importlib.util

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module



def tiny_text_classifier(tmp_path: Path, num_labels: int = 3) -> dict:
    """A seeded 2-layer BERT classifier teacher (32 wide, MiniLM's tokenizer) in tmp_path/teacher and a 12-row
    3-class CSV; returns a classification recipe (dict) distilling a 1-layer student from it, 2 steps."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from potstill.assets import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=num_labels)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    rows = [("the match ended in a draw", "sport"), ("shares fell sharply today", "business"),
            ("a new phone was announced", "tech")] * 4
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    return {"name": "text", "output_dir": str(tmp_path / "runs"), "task": "classification",
            "teacher": {"path": str(tmp_path / "teacher")}, "student": {"init": "layers_from_teacher", "layers": [0]},
            "data": {"train": str(tmp_path / "train.csv"), "max_length": 16},
            "objectives": [{"name": "forward_kl"}], "trainer": {"max_steps": 2, "batch_size": 4, "num_threads": 1},
            "eval": {"throughput": False, "compare_before": False}}


class CrashInStep(Exception):
    """Raised inside a training step by `fit_until_crash`: a run that dies mid-step."""


def fit_until_crash(recipe, at_call: int, error: type[BaseException] = CrashInStep) -> None:
    """Train `recipe` through the Distiller and raise `error` from the teacher pass of its `at_call`-th
    micro-batch, as a killed run would stop; the checkpoints written before stay in the run folder."""
    from potstill.tasks import build_task
    from potstill.train import Distiller, build_objectives

    task = build_task(recipe, run_dir=recipe.run_dir)
    original, calls = task.teacher_signal, {"n": 0}

    def crash_at_call(batch):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise error
        return original(batch)

    task.teacher_signal = crash_at_call
    with pytest.raises(error):
        Distiller(task, build_objectives(recipe, task), recipe.trainer, run_dir=recipe.run_dir,
                  eval_config=recipe.eval).fit()


def tiny_search_recipe(tmp_path: Path, *, max_steps: int) -> dict:
    """The search tests' base: a 3-layer, 32-wide BERT teacher (head size 16) and an embedding recipe (dict) on 16
    short texts with 8 held out, starting from teacher layer 0."""
    teacher = tiny_bert_encoder(tmp_path / "teacher", num_hidden_layers=3)
    texts = ["a small cat sat", "the dog ran far away", "rain on the roof", "two plus two is four"]
    train = numbered_texts_jsonl(tmp_path / "train.jsonl", texts * 4)
    held = numbered_texts_jsonl(tmp_path / "eval.jsonl", texts * 2)
    return embedding_recipe(tmp_path, teacher, train, eval_data=held, name="tiny",
                            student={"init": "layers_from_teacher", "layers": [0]},
                            objectives=[{"name": "embedding_mse"}], max_steps=max_steps)


def tiny_digit_lm(max_positions: int = 256):
    """(model, tokenizer): a 1-layer Llama with a byte-level BPE in which every digit is one token (a judging LM)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<pad>", "<eos>"])
    tk.train_from_iterator(["what is two plus two", "the answer is right", "judge the answer"], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_positions)
    return LlamaForCausalLM(config), tok
