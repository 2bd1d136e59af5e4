"""Regression tests for the first-use traps of issue #18 (one test group per trap)."""

from __future__ import annotations

import pytest
import transformers
from conftest import tiny_bert_encoder
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification

from potstill.tasks.models import load_hf_teacher


@pytest.fixture
def quiet_transformers():
    """As the CLI runs: transformers' own loading report is silenced."""
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(before)


# ---- trap 1: a classification teacher whose head is freshly initialised must not be silent
def test_teacher_without_classifier_head_warns(tmp_path, capsys, quiet_transformers):
    folder = tiny_bert_encoder(tmp_path / "encoder", num_hidden_layers=1)  # a plain encoder: no classifier
    capsys.readouterr()
    load_hf_teacher(str(folder), AutoModelForSequenceClassification)
    err = capsys.readouterr().err
    assert "warning: field teacher.path:" in err
    assert "classifier.bias, classifier.weight" in err
    assert len([line for line in err.splitlines() if "warning" in line]) == 1  # one line


def test_fine_tuned_teacher_loads_without_warning(tmp_path, capsys, quiet_transformers):
    folder = tiny_bert_encoder(tmp_path / "encoder", num_hidden_layers=1)
    BertForSequenceClassification.from_pretrained(folder).save_pretrained(tmp_path / "clf")  # head now saved
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path / "clf")
    capsys.readouterr()
    load_hf_teacher(str(tmp_path / "clf"), AutoModelForSequenceClassification)
    assert "warning" not in capsys.readouterr().err
