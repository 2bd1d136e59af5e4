"""Model soups: one student whose weights are the mean of several fine-tuned students' weights.

Paper: Wortsman et al., ICML 2022, "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time". The uniform soup of n students fine-tuned from the same pretrained weights
(other seeds, data orders or settings) is

    θ_soup = (1/n) · Σ_i θ_i

for every floating-point tensor, computed in float64 and stored in the students' dtype; integer tensors (buffers)
must agree and are copied. It works when the students stay in one basin of the loss, which fine-tuning from a
shared start usually gives; students trained from different random inits do not average. The soup has the size
and speed of one student and costs the training of n.

`uniform_soup` reads Hugging Face student folders with a single `model.safetensors` and writes the soup folder
atomically: the first student's other files (config, tokenizer, chat template) and the averaged weights.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from potstill.errors import UserError
from potstill.io import atomic_dir

WEIGHTS = "model.safetensors"


def average_weights(states: Sequence[dict[str, torch.Tensor]], *, names: Sequence[str] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The uniform mean of `states` (same keys and shapes) for floating-point tensors; integer tensors must be
    equal and are copied. `names` label the states in error messages."""
    if not states:
        raise UserError("soup: no students to average; give at least one student folder")
    names = list(names) if names is not None else [f"student {k}" for k in range(len(states))]
    first = states[0]
    for name, state in zip(names[1:], states[1:], strict=True):
        if state.keys() != first.keys():
            only = sorted(state.keys() ^ first.keys())[:3]
            raise UserError(f"soup: {name} has other weights than {names[0]} (e.g. {only}); a soup needs students "
                            f"of one architecture")
        for key, tensor in state.items():
            if tensor.shape != first[key].shape:
                raise UserError(f"soup: weight {key} is {tuple(tensor.shape)} in {name} but "
                                f"{tuple(first[key].shape)} in {names[0]}; a soup needs students of one shape")
            if not tensor.is_floating_point() and not torch.equal(tensor, first[key]):
                raise UserError(f"soup: the integer tensor {key} differs between {names[0]} and {name}")
    return {key: (sum(s[key].double() for s in states) / len(states)).to(tensor.dtype)
            if tensor.is_floating_point() else tensor.clone() for key, tensor in first.items()}


def uniform_soup(folders: Sequence[str | Path], out: str | Path) -> Path:
    """Average the students in `folders` (each a folder with `model.safetensors`) into the folder `out`."""
    from safetensors.torch import load_file, save_file

    paths = [Path(f) for f in folders]
    for folder in paths:
        if not (folder / WEIGHTS).is_file():
            raise UserError(f"soup: {folder} has no {WEIGHTS}; give saved student folders (a run's student/)")
    soup = average_weights([load_file(str(f / WEIGHTS)) for f in paths], names=[str(f) for f in paths])
    with atomic_dir(out) as tmp:
        for item in paths[0].iterdir():
            if item.is_file() and item.name != WEIGHTS and not item.name.startswith("."):
                shutil.copy2(item, tmp / item.name)
        save_file({k: v.contiguous() for k, v in soup.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
    return Path(out)
