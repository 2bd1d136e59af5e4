"""Model soups (potstill.students.soup): the uniform mean of students' weights, checked by hand on tiny models."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_causal_lm import llama, make_tokenizer
from transformers import AutoModelForCausalLM

from potstill.errors import UserError
from potstill.students.soup import average_weights, uniform_soup


def test_the_average_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5], dtype=torch.bfloat16), "n": torch.tensor([3])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([1.5], dtype=torch.bfloat16), "n": torch.tensor([3])}
    c = {"w": torch.tensor([2.0, 1.0]), "b": torch.tensor([1.0], dtype=torch.bfloat16), "n": torch.tensor([3])}
    soup = average_weights([a, b, c])
    assert torch.equal(soup["w"], torch.tensor([2.0, 3.0]))
    assert soup["b"].dtype == torch.bfloat16 and soup["b"].item() == 1.0
    assert torch.equal(soup["n"], torch.tensor([3]))
    assert torch.equal(average_weights([a])["w"], a["w"])


def test_students_that_do_not_match_are_refused():
    a = {"w": torch.zeros(2), "n": torch.tensor([1])}
    with pytest.raises(UserError, match="other weights"):
        average_weights([a, {"v": torch.zeros(2), "n": torch.tensor([1])}])
    with pytest.raises(UserError, match=r"weight w is \(3,\)"):
        average_weights([a, {"w": torch.zeros(3), "n": torch.tensor([1])}])
    with pytest.raises(UserError, match="integer tensor n differs"):
        average_weights([a, {"w": torch.zeros(2), "n": torch.tensor([2])}])
    with pytest.raises(UserError, match="no students"):
        average_weights([])


def test_a_soup_folder_loads_as_a_model_with_the_mean_weights(tmp_path):
    tok = make_tokenizer()
    folders = []
    for seed in range(3):
        folder = tmp_path / f"s{seed}"
        llama(len(tok), seed=seed).save_pretrained(folder)
        tok.save_pretrained(folder)
        folders.append(folder)
    out = uniform_soup(folders, tmp_path / "soup")
    model = AutoModelForCausalLM.from_pretrained(out)
    states = [load_file(str(f / "model.safetensors")) for f in folders]
    for key, value in model.state_dict().items():
        if key in states[0]:
            torch.testing.assert_close(value, sum(s[key] for s in states) / 3)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".soup.*"))   # the temp folder was renamed into place
    with pytest.raises(UserError, match="has no model.safetensors"):
        uniform_soup([tmp_path], tmp_path / "bad")
