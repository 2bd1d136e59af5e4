"""LAD: the label-noising operator, the dual-path teacher loss and the pixel-wise student loss against hand-computed
values on 2-pixel maps; the shapes data set; the teacher / student builders; the benchmark's mIoU and a tiny run."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load_benchmark

from potstill.data.shapes import ShapesConfig, make_shapes, shifted
from potstill.errors import UserError
from potstill.losses.lad import (
    consistency_distance,
    label_channels,
    lad_student_loss,
    lad_teacher_loss,
    noise_labels,
)
from potstill.teachers.lad import LabelAssistedTeacher, segmentation_net

LN2, LN3 = math.log(2), math.log(3)


def two_pixel_maps() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1, C=2, 1, 2) logits: a = [[0,0], [ln3,0]] → p = (.5,.5), (.75,.25); b = (.75,.25) at both pixels."""
    a = torch.tensor([[[[0.0, LN3]], [[0.0, 0.0]]]])
    b = torch.tensor([[[[LN3, LN3]], [[0.0, 0.0]]]])
    labels = torch.tensor([[[0, 1]]])
    return a, b, labels


def test_symmetric_kl_consistency_matches_hand_value():
    a, b, _ = two_pixel_maps()
    # pixel 0: ½[(.5−.75)(ln .5 − ln .75) + (.5−.25)(ln .5 − ln .25)] = ⅛ ln 3; pixel 1: 0 → mean ln3/16
    assert consistency_distance(a, b).item() == pytest.approx(LN3 / 16, abs=1e-6)
    assert consistency_distance(b, a).item() == pytest.approx(LN3 / 16, abs=1e-6)


def test_mse_consistency_matches_hand_value():
    a, b, _ = two_pixel_maps()
    # pixel 0: .25² + .25² = .125; pixel 1: 0 → mean .0625
    assert consistency_distance(a, b, "mse").item() == pytest.approx(0.0625, abs=1e-6)


def test_teacher_loss_is_two_cross_entropies_plus_weighted_distance():
    a, b, labels = two_pixel_maps()
    # CE(a) = mean(ln2, ln4) = 1.5 ln2; CE(b) = mean(ln 4/3, ln4) = 2 ln2 − ½ ln3
    ce = 1.5 * LN2 + 2 * LN2 - 0.5 * LN3
    assert lad_teacher_loss(a, b, labels, consistency_weight=0.0).item() == pytest.approx(ce, abs=1e-6)
    assert lad_teacher_loss(a, b, labels, consistency_weight=2.0).item() == pytest.approx(ce + 2 * LN3 / 16, abs=1e-6)
    assert lad_teacher_loss(a, b, labels, 2.0, "mse").item() == pytest.approx(ce + 2 * 0.0625, abs=1e-6)


def test_teacher_loss_gradient_reaches_both_paths():
    a, b, labels = two_pixel_maps()
    a.requires_grad_(True)
    b.requires_grad_(True)
    lad_teacher_loss(a, b, labels, 1.0).backward()
    assert a.grad is not None and b.grad is not None and a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_student_loss_matches_hand_value_at_t1():
    a, b, labels = two_pixel_maps()
    # student a, teacher b. CE = 1.5 ln2. KL(t‖s) pixel 0 = .75 ln(.75/.5) + .25 ln(.25/.5) = .75 ln3 − ln2; pixel 1 0
    kl = (0.75 * LN3 - LN2) / 2
    assert lad_student_loss(a, b, labels, alpha=0.5).item() == pytest.approx(1.5 * LN2 + 0.5 * kl, abs=1e-6)


def test_student_loss_scales_kl_by_t_squared():
    a, b, labels = two_pixel_maps()
    # T = 2: teacher pixel 0 logits (ln3/2, 0) → q = (√3, 1)/(1+√3); student (0,0)/2 → (.5,.5); pixel 1 identical
    q1 = math.sqrt(3) / (1 + math.sqrt(3))
    q2 = 1 - q1
    kl = (q1 * math.log(2 * q1) + q2 * math.log(2 * q2)) / 2
    expected = 1.5 * LN2 + 1.0 * 4 * kl
    assert lad_student_loss(a, b, labels, alpha=1.0, temperature=2.0).item() == pytest.approx(expected, abs=1e-6)


def test_student_loss_does_not_train_the_teacher():
    a, b, labels = two_pixel_maps()
    a.requires_grad_(True)
    b.requires_grad_(True)
    lad_student_loss(a, b, labels).backward()
    assert b.grad is None and a.grad is not None


def test_student_loss_rejects_mismatched_shapes_and_bad_temperature():
    a, b, labels = two_pixel_maps()
    with pytest.raises(ValueError, match="shape"):
        lad_student_loss(a, b[:, :, :, :1], labels)
    with pytest.raises(ValueError, match="temperature"):
        lad_student_loss(a, b, labels, temperature=0.0)


def test_noise_labels_p0_is_identity_and_p1_with_one_class_is_all_that_class():
    labels = torch.tensor([[[0, 1], [2, 1]]])
    assert torch.equal(noise_labels(labels, 3, p=0.0), labels)
    assert torch.equal(noise_labels(labels, 1, p=1.0), torch.zeros_like(labels))


def test_noise_labels_pixel_mode_changes_about_p_times_c_minus_1_over_c():
    labels = torch.zeros(1, 200, 200, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    changed = (noise_labels(labels, 3, p=0.5, generator=gen) != labels).float().mean().item()
    assert changed == pytest.approx(0.5 * 2 / 3, abs=0.02)


def test_noise_labels_block_mode_gives_one_class_per_region():
    labels = torch.zeros(1, 6, 6, dtype=torch.long)
    gen = torch.Generator().manual_seed(1)
    noised = noise_labels(labels, 5, p=1.0, mode="block", block=4, generator=gen)
    assert noised.shape == (1, 6, 6)
    for rows in (slice(0, 4), slice(4, 6)):
        for cols in (slice(0, 4), slice(4, 6)):
            region = noised[0, rows, cols]
            assert (region == region[0, 0]).all()


def test_noise_labels_is_reproducible_with_a_generator_and_rejects_bad_arguments():
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    first = noise_labels(labels, 3, generator=torch.Generator().manual_seed(4))
    again = noise_labels(labels, 3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    with pytest.raises(ValueError, match="p must"):
        noise_labels(labels, 3, p=1.5)
    with pytest.raises(ValueError, match="mode"):
        noise_labels(labels, 3, mode="stripes")
    with pytest.raises(ValueError, match="N, H, W"):
        noise_labels(labels[0], 3)


def test_label_channels_one_hot():
    channels = label_channels(torch.tensor([[[0, 2]]]), 3)
    assert channels.shape == (1, 3, 1, 2)
    assert channels[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert channels[0, :, 0, 1].tolist() == [0.0, 0.0, 1.0]


def test_shapes_are_reproducible_and_well_formed():
    images, masks = make_shapes(6, seed=3)
    again_images, again_masks = make_shapes(6, seed=3)
    assert images.shape == (6, 1, 32, 32) and images.dtype == torch.float32
    assert masks.shape == (6, 32, 32) and masks.dtype == torch.long
    assert torch.equal(images, again_images) and torch.equal(masks, again_masks)
    assert set(masks.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(make_shapes(6, seed=4)[1], masks)


def test_shapes_without_noise_paint_exactly_the_mask():
    cfg = ShapesConfig(noise=0.0, texture=0.0, contrast=0.8, max_shapes=1, min_radius=3.0, max_radius=3.0)
    images, masks = make_shapes(4, seed=0, config=cfg)
    assert torch.equal(images[:, 0], 0.8 * (masks > 0).float())
    for mask in masks:
        area = int((mask > 0).sum())
        # radius 3: a square covers 7×7 = 49 pixels (centres are not integers: 6 to 7 per side → 36..49),
        # a disc about π·9 ≈ 28
        assert 20 <= area <= 49


def test_shifted_config_and_config_errors():
    cfg = shifted(ShapesConfig())
    assert cfg.noise == pytest.approx(0.75)
    assert cfg.min_radius == 2.0 and cfg.max_radius == pytest.approx(0.7 * 6.5)
    with pytest.raises(UserError, match="radii"):
        ShapesConfig(min_radius=5.0, max_radius=4.0)
    with pytest.raises(UserError, match="n must"):
        make_shapes(0, seed=0)


def test_segmentation_net_size_and_seed():
    net = segmentation_net(1, 3, width=2, seed=0)
    # conv 1→2: 20, 2→2: 38; coarse 2→4: 76, 4→4: 148; head 6→2: 110, 1×1 2→3: 9
    assert sum(p.numel() for p in net.parameters()) == 401
    same = segmentation_net(1, 3, width=2, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), same.parameters(), strict=True))
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 3, 8, 8)


def test_label_assisted_teacher_reads_the_label_channels():
    teacher = LabelAssistedTeacher(1, 3, width=4, seed=0)
    images = torch.zeros(1, 1, 8, 8)
    zeros = torch.zeros(1, 8, 8, dtype=torch.long)
    twos = torch.full((1, 8, 8), 2)
    assert teacher(images, zeros).shape == (1, 3, 8, 8)
    assert not torch.allclose(teacher(images, zeros), teacher(images, twos))
    with pytest.raises(UserError, match="labels must be"):
        teacher(images, torch.zeros(1, 4, 4, dtype=torch.long))


def test_benchmark_mean_iou_hand_value():
    bench = load_benchmark("lad_segmentation")
    target = torch.tensor([0, 0, 1, 2])
    pred = torch.tensor([0, 1, 1, 2])
    # class 0: 1/2, class 1: 1/2, class 2: 1/1 → 2/3
    assert bench.mean_iou(pred, target) == pytest.approx(2 / 3)


def test_benchmark_tiny_run_prints_every_row_and_merges_its_output(capsys, tmp_path):
    bench = load_benchmark("lad_segmentation")
    threads = torch.get_num_threads()
    out_file = tmp_path / "lad.json"
    try:
        assert bench.main(["--seeds", "0", "--train", "16", "--test", "8", "--epochs", "1", "--draws", "2",
                           "--teacher-width", "2", "--student-width", "2", "--out", str(out_file)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert bench.main(["--merge", str(out_file), str(out_file)]) == 0
    merged = capsys.readouterr().out
    assert "| model (2 seeds, mean ± sd over seeds) |" in merged
    assert "± 0.000 |" in merged  # the same run twice: no spread
    for row in ("image-only teacher", "LAD teacher p=0.5 λ=0", "LAD teacher p=0.5 λ=1", "student, labels only",
                "student ← image-only teacher", "student ← LAD teacher λ=1"):
        assert f"| {row} |" in out
