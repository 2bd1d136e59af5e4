"""Hugging Face Hub ids in recipes (`potstill.hub`): a cached model id and a cached dataset id load offline from a
hub cache laid out in a temp folder; an uncached id is one line naming the field, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_yaml
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from potstill.assets import minilm_path
from potstill.cli import main
from potstill.config.paths import resolve_path
from potstill.errors import UserError
from potstill.hub import looks_like_hub_id, model_folder

ROWS = [{"text": "The shares rose after strong profits.", "label": "business"},
        {"text": "The striker scored twice in the final.", "label": "sport"}] * 8


def _cached_repo(cache: Path, kind: str, repo_id: str, revision: str = "0123abcd") -> Path:
    """The snapshot folder of `repo_id` in the hub cache layout (`<kind>s--org--name/snapshots/<rev>` plus
    `refs/main` naming that revision), empty, for the caller to fill."""
    repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An offline hub cache in tmp_path holding the model org/tiny-topics-bert and the dataset org/tiny-topics."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=2, id2label={0: "business", 1: "sport"},
                        label2id={"business": 0, "sport": 1})
    model_dir = _cached_repo(cache, "model", "org/tiny-topics-bert")
    BertForSequenceClassification(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data_dir = _cached_repo(cache, "dataset", "org/tiny-topics")
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return cache


def _recipe(folder: Path, teacher: str, train: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_yaml(folder / "recipe.yaml", {
        "name": "hub", "output_dir": str(folder / "runs"), "task": "classification",
        "teacher": {"path": teacher}, "student": {"init": "layers_from_teacher", "layers": [0]},
        "data": {"train": train, "max_length": 16},
        "objectives": [{"name": "forward_kl"}],
        "trainer": {"max_steps": 2, "batch_size": 8, "num_threads": 1},
        "eval": {"throughput": False, "compare_before": False}})


def _one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1 and errors[0].startswith("potstill: error: "), err
    return errors[0]


def test_cached_model_and_dataset_ids_run_offline(tmp_path, hub_cache, capsys):
    recipe = _recipe(tmp_path / "recipe", "org/tiny-topics-bert", "org/tiny-topics")
    assert main(["run", str(recipe)]) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "recipe" / "runs" / "hub" / "summary.json").read_text())
    assert summary["steps"] == 2
    saved = json.loads((tmp_path / "recipe" / "runs" / "hub" / "student" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 1 and saved["label2id"] == {"business": 0, "sport": 1}


def test_model_id_resolves_to_its_cached_snapshot(hub_cache):
    folder = Path(model_folder("org/tiny-topics-bert", field="teacher.path"))
    assert folder == hub_cache / "models--org--tiny-topics-bert" / "snapshots" / "0123abcd"


def test_uncached_model_id_is_one_line_exit_2(tmp_path, hub_cache, capsys):
    err = _one_line_error(capsys, ["run", str(_recipe(tmp_path / "r", "org/not-cached", "org/tiny-topics"))])
    assert "field teacher.path" in err and "'org/not-cached'" in err
    assert "HF_HUB_OFFLINE=1 is set" in err and str(hub_cache) in err


def test_uncached_dataset_id_is_one_line_exit_2(tmp_path, hub_cache, capsys):
    err = _one_line_error(capsys, ["run", str(_recipe(tmp_path / "r", "org/tiny-topics-bert", "org/no-data"))])
    assert "field data.train.path" in err and "'org/no-data'" in err and "HF_HUB_OFFLINE=1 is set" in err


def test_unreachable_hub_when_online_names_the_reason(hub_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def no_network(repo_id, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        raise LocalEntryNotFoundError("connection error")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(UserError, match=r"field student.path: .*'org/x'.*cannot be reached \(no network\?\)"):
        model_folder("org/x", field="student.path")
    assert calls == [True, False]  # the cache first, without a request; then the download


def test_missing_local_path_is_not_taken_for_an_id(tmp_path):
    with pytest.raises(UserError, match="field teacher.path: model folder not found: ./models/teacher"):
        model_folder("./models/teacher", field="teacher.path")


@pytest.mark.parametrize(("value", "model", "dataset"), [
    ("org/name", True, True), ("gpt2", True, True), ("sentence-transformers/all-MiniLM-L6-v2", True, True),
    ("data/train.jsonl", True, False), ("train.csv", True, False), ("a/b/c", False, False),
    ("../up", False, False), ("/abs/path", False, False), ("./rel", False, False), ("builtin:bbc", False, False),
])
def test_looks_like_hub_id(value, model, dataset):
    assert looks_like_hub_id(value) is model
    assert looks_like_hub_id(value, dataset=True) is dataset


def test_data_path_keeps_a_dataset_id_and_resolves_a_missing_file(tmp_path):
    assert resolve_path("org/name", tmp_path, dataset_id=True) == "org/name"
    assert resolve_path("train.jsonl", tmp_path, dataset_id=True) == str(tmp_path / "train.jsonl")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()  # a local folder wins over the id
    assert resolve_path("org/name", tmp_path, dataset_id=True) == str(tmp_path / "org" / "name")
