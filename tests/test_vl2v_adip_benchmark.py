"""Pieces of benchmarks/vl2v_adip.py's Fashion-MNIST leg that can be checked by hand: the teacher's random
views and the students' view of a whole Fashion frame."""

from __future__ import annotations

import pytest
import torch
from conftest import load_benchmark

bench = load_benchmark("vl2v_adip")


def test_random_turn_and_zoom_is_the_identity_in_eval_mode_and_at_zero_range():
    x = torch.rand(3, 1, 8, 8)
    views = bench.RandomTurnAndZoom()
    assert torch.equal(views.eval()(x), x)
    still = bench.RandomTurnAndZoom(degrees=0.0, min_scale=1.0).train()
    assert torch.allclose(still(x), x, atol=1e-5)


def test_random_turn_and_zoom_only_zooms_out_and_varies_per_image():
    torch.manual_seed(0)
    blank = torch.ones(64, 1, 16, 16)
    out = bench.RandomTurnAndZoom(degrees=40.0, min_scale=0.5).train()(blank)
    mass = out.sum(dim=(1, 2, 3))
    assert float(mass.max()) <= 256 + 1e-3  # nothing grows: zoom-outs and turns keep or lose area
    assert float(mass.min()) >= 0.25 * 256 * 0.5  # at worst a half-size square, turned
    assert float(mass.std()) > 1.0  # each image draws its own angle and scale


def test_student_view_of_fashion_is_the_whole_frame():
    frame = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    frame[..., 0:2, 0:2] = 255  # a corner the digit view's centre crop would cut away
    assert float(bench.student_pixels(frame, "fashion")[0, 0, 0, 0]) > 0.5
    assert float(bench.student_pixels(frame, "digits").max()) == 0.0
    assert bench.student_pixels(frame, "fashion").shape == (1, 1, 16, 16)


def test_train_rows_reports_every_optimizer_step():
    import _digit_views

    seen = []
    model = torch.nn.Linear(4, 2)
    _digit_views.train_rows(model, lambda out, rows: out.pow(2).mean(), torch.rand(10, 4), epochs=2, seed=0, batch=4,
                            lr=1e-2, after_step=lambda step, steps: seen.append((step, steps)))
    assert seen == [(s, 6) for s in range(1, 7)]  # 3 batches (4 + 4 + 2 rows) × 2 epochs


def test_swa_start_outside_a_fraction_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--swa-start", "1.0"])
    assert exit_info.value.code == 2 and "--swa-start" in capsys.readouterr().err
