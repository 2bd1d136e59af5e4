"""benchmarks/embedding_interpolation.py's weight mix: one a for all, or its own a per parameter-name prefix."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import load_benchmark


def test_mix_with_one_alpha_and_per_prefix_alphas():
    mix = load_benchmark("embedding_interpolation")
    start = {"embeddings.word": torch.zeros(2), "encoder.layer.0.w": torch.zeros(2), "encoder.layer.1.w":
             torch.zeros(2), "position_ids": torch.tensor([0, 1])}
    end = {"embeddings.word": torch.ones(2), "encoder.layer.0.w": torch.full((2,), 2.0), "encoder.layer.1.w":
           torch.full((2,), 4.0), "position_ids": torch.tensor([5, 6])}
    plain = mix.interpolated(start, end, 0.5)
    assert [plain[k].tolist() for k in end] == [[0.5, 0.5], [1.0, 1.0], [2.0, 2.0], [5, 6]]
    own = mix.interpolated(start, end, 0.5, {"embeddings.": 0.0, "encoder.": 1.0, "encoder.layer.1.": 0.25})
    assert [own[k].tolist() for k in end] == [[0.0, 0.0], [2.0, 2.0], [1.0, 1.0], [5, 6]]
    assert mix._prefix_alpha("encoder.layer.1.=0.3") == ("encoder.layer.1.", 0.3)
    with pytest.raises(argparse.ArgumentTypeError):
        mix._prefix_alpha("embeddings.=x")
    with pytest.raises(SystemExit):
        mix.interpolated(start, {"other": torch.ones(2)}, 0.5)
