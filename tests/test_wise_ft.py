"""trainer.wise_ft_alpha (WiSE-FT): the saved student is (1 − α)·init + α·trained, also after --resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import fit_until_crash
from safetensors.torch import load_file

from potstill.config import validate_recipe
from potstill.errors import UserError
from potstill.train import checkpoint as ckpt
from potstill.train import run_recipe
from potstill.train.wise_ft import INIT_FILE, WiSEFT, interpolate_weights


def test_interpolation_by_hand():
    init = {"w": torch.tensor([0.0, 2.0]), "pos": torch.tensor([0, 1]), "h": torch.tensor([1.0], dtype=torch.bfloat16)}
    trained = {"w": torch.tensor([4.0, -2.0]), "pos": torch.tensor([5, 6]),
               "h": torch.tensor([3.0], dtype=torch.bfloat16)}
    mixed = interpolate_weights(init, trained, 0.25)
    assert torch.equal(mixed["w"], torch.tensor([1.0, 1.0]))  # 0.75·0 + 0.25·4, 0.75·2 + 0.25·(−2)
    assert torch.equal(mixed["pos"], torch.tensor([5, 6]))  # integer buffers: the trained values
    assert mixed["h"].dtype == torch.bfloat16 and mixed["h"].item() == 1.5
    with pytest.raises(ValueError, match="different weights"):
        interpolate_weights({"w": init["w"]}, trained, 0.5)
    with pytest.raises(ValueError, match=r"weight w: init shape \(3,\)"):
        interpolate_weights({**init, "w": torch.zeros(3)}, trained, 0.5)


def test_capture_apply_and_reload(tmp_path):
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0]]))
        model.bias.fill_(2.0)
    wise = WiSEFT(0.5, tmp_path)
    wise.capture(model, write=True)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 1.0]]))
        model.bias.fill_(0.0)
    again = WiSEFT(0.5, tmp_path)
    again.load()  # what a resumed run reads: the weights stored at the start, not the trained ones
    again.apply(model)
    assert torch.equal(model.weight, torch.tensor([[2.0, 0.0]])) and model.bias.item() == 1.0
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        WiSEFT(1.0, tmp_path)
    with pytest.raises(UserError, match="wise_ft_init.safetensors is missing"):
        WiSEFT(0.5, tmp_path / "elsewhere").load()


def _recipe(digits_recipe, name: str, **trainer) -> dict:
    return dict(digits_recipe, name=name, trainer={**digits_recipe["trainer"], **trainer})


def _student(recipe) -> dict[str, torch.Tensor]:
    return load_file(str(recipe.run_dir / "student" / "model.safetensors"))


def test_run_saves_the_mix_of_init_and_trained(digits_recipe, capsys):
    plain = validate_recipe(_recipe(digits_recipe, "plain"))
    run_recipe(plain)
    mixed = validate_recipe(_recipe(digits_recipe, "mixed", wise_ft_alpha=0.3))
    summary = run_recipe(mixed)
    assert "WiSE-FT: the student is now 0.7 × its init + 0.3 × its trained weights" in capsys.readouterr().err
    init, trained, saved = load_file(str(mixed.run_dir / INIT_FILE)), _student(plain), _student(mixed)
    assert saved.keys() == trained.keys()
    for key in trained:
        assert not torch.equal(init[key], trained[key])  # training moved every weight ...
        torch.testing.assert_close(saved[key], 0.7 * init[key] + 0.3 * trained[key])  # ... and the mix is saved
    assert summary["wise_ft_alpha"] == 0.3
    assert summary["table"][-1] != json.loads((plain.run_dir / "summary.json").read_text())["table"][-1]
    # a new run into the folder without WiSE-FT drops the stored init
    run_recipe(validate_recipe(_recipe(digits_recipe, "mixed")), overwrite=True)
    assert not (mixed.run_dir / INIT_FILE).exists()


def test_resume_mixes_with_the_init_of_the_start(digits_recipe):
    """Killed at step 4 with a checkpoint at 2, then resumed: the same saved student as an uninterrupted run."""
    straight = validate_recipe(_recipe(digits_recipe, "straight", wise_ft_alpha=0.5, save_every=2))
    run_recipe(straight)
    halted = validate_recipe(_recipe(digits_recipe, "halted", wise_ft_alpha=0.5, save_every=2))
    fit_until_crash(halted, 4)
    assert [s for s, _ in ckpt.list_checkpoints(halted.run_dir / "checkpoints")] == [2]
    lost = validate_recipe(_recipe(digits_recipe, "lost", wise_ft_alpha=0.5, save_every=2))
    shutil.copytree(halted.run_dir, lost.run_dir)
    run_recipe(halted, resume=True)
    a, b = _student(straight), _student(halted)
    assert all(torch.equal(a[k], b[k]) for k in a)
    (lost.run_dir / INIT_FILE).unlink()  # a resumed run never mixes with weights other than its start's
    with pytest.raises(UserError, match="wise_ft_init.safetensors is missing"):
        run_recipe(lost, resume=True)


def test_recipe_rules(digits_recipe):
    with pytest.raises(UserError, match=r"trainer.wise_ft_alpha"):
        validate_recipe(_recipe(digits_recipe, "x", wise_ft_alpha=1.0))
    early = _recipe(digits_recipe, "x", wise_ft_alpha=0.5,
                    early_stopping={"metric": "accuracy", "mode": "max"})
    early["eval"] = {**digits_recipe["eval"], "every": 1}
    with pytest.raises(UserError, match=r"field trainer.wise_ft_alpha: .*trainer.early_stopping"):
        validate_recipe(early)
