"""trainer.optimizer: each choice is the library's own optimizer, checked on hand-computed steps; the default
stays torch's AdamW, bit for bit."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from potstill.config import validate_recipe
from potstill.errors import UserError
from potstill.train import checkpoint as ckpt
from potstill.train import run_recipe
from potstill.train.optim import build_optimizer


def _one_step(name: str, weight_decay: float = 0.0, **kw) -> torch.Tensor:
    """w = [1, 2], loss = Σ w² (gradient 2w), one step of `name` at lr 0.1."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = build_optimizer(name, [{"params": [w], "weight_decay": weight_decay}], lr=0.1, betas=(0.9, 0.999), **kw)
    (w ** 2).sum().backward()
    opt.step()
    return w.detach()


def test_sgd_step_by_hand():
    # w − lr·(g + wd·w): g = [2, 4]; with wd 0.5: g + wd·w = [2.5, 5]
    torch.testing.assert_close(_one_step("sgd"), torch.tensor([0.8, 1.6]))
    torch.testing.assert_close(_one_step("sgd", weight_decay=0.5), torch.tensor([0.75, 1.5]))


def test_adamw_first_step_by_hand_and_fused_matches():
    # Adam's first step moves each weight by lr · m̂/(√v̂ + ε) = lr · sign(g) (bias-corrected), after the decoupled
    # decay w·(1 − lr·wd)
    torch.testing.assert_close(_one_step("adamw"), torch.tensor([0.9, 1.9]))
    torch.testing.assert_close(_one_step("adamw", weight_decay=0.5), torch.tensor([0.95 - 0.1, 1.9 - 0.1]))
    opt_types = [type(build_optimizer(n, [{"params": [torch.nn.Parameter(torch.ones(2))]}], lr=0.1,
                                      betas=(0.9, 0.999))) for n in ("adamw", "adamw_fused")]
    assert opt_types == [torch.optim.AdamW, torch.optim.AdamW]
    torch.testing.assert_close(_one_step("adamw_fused", weight_decay=0.5), _one_step("adamw", weight_decay=0.5))


def test_adafactor_is_transformers_at_the_given_lr():
    from transformers.optimization import Adafactor

    opt = build_optimizer("adafactor", [{"params": [torch.nn.Parameter(torch.ones(2))]}], lr=0.1, betas=(0.9, 0.999))
    assert isinstance(opt, Adafactor)
    # first step of a vector: v = g² (β2 is 0 at step 1), update g/√v = sign(g), RMS 1 (not clipped), × lr
    torch.testing.assert_close(_one_step("adafactor"), torch.tensor([0.9, 1.9]), atol=1e-5, rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adamw_8bit_without_bitsandbytes_names_the_install():
    with pytest.raises(UserError, match="trainer.optimizer: adamw_8bit needs bitsandbytes.*pip install bitsandbytes"):
        _one_step("adamw_8bit")


def test_momentum_is_only_for_sgd(digits_recipe):
    raw = dict(digits_recipe, trainer={**digits_recipe["trainer"], "momentum": 0.9})
    with pytest.raises(Exception, match="trainer.momentum is SGD's"):
        validate_recipe(raw)
    with pytest.raises(Exception, match="trainer.optimizer"):
        validate_recipe(dict(digits_recipe, trainer={**digits_recipe["trainer"], "optimizer": "adam"}))


def _student(recipe) -> dict[str, torch.Tensor]:
    return load_file(str(recipe.run_dir / "student" / "model.safetensors"))


def test_default_run_is_explicit_adamw_bit_for_bit(digits_recipe):
    default = validate_recipe(dict(digits_recipe, name="default"))
    explicit = validate_recipe(dict(digits_recipe, name="explicit",
                                    trainer={**digits_recipe["trainer"], "optimizer": "adamw"}))
    assert default.trainer.optimizer == "adamw"
    run_recipe(default)
    run_recipe(explicit)
    wa, wb = _student(default), _student(explicit)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_run_trains_with_the_chosen_optimizer(digits_recipe):
    raw = dict(digits_recipe, trainer={**digits_recipe["trainer"], "max_steps": 2, "optimizer": "sgd",
                                       "momentum": 0.5})
    recipe = validate_recipe(raw)
    run_recipe(recipe)
    state = ckpt.load_torch(ckpt.latest_checkpoint(recipe.run_dir / "checkpoints") / "optimizer.pt")
    assert state["param_groups"][0]["momentum"] == 0.5 and "betas" not in state["param_groups"][0]
    assert all("momentum_buffer" in s for s in state["state"].values())
