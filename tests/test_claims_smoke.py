"""The claim scripts of issue #16 §3 (benchmarks/claim_*.py): each --quick path end to end, plus facts of their toys
that can be checked by hand or hold by construction."""

from __future__ import annotations

import math
from types import ModuleType

import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def claim_taid() -> ModuleType:
    return load_benchmark("claim_taid")


@pytest.fixture(scope="module")
def claim_hacking() -> ModuleType:
    return load_benchmark("claim_teacher_hacking")


@pytest.fixture(autouse=True)
def keep_thread_count():
    """The scripts set torch's thread count; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_taid_quick_prints_both_tables(claim_taid, capsys):
    assert claim_taid.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "Part 1: bimodal toy" in out and "Part 2: capacity ladder" in out
    for loss in ("fkl", "rkl", "taid"):
        assert f"\n{loss} " in out
    assert "\n   16 " in out and "\n    2 " in out  # one ladder row per width


def test_bimodal_teacher_is_the_stated_mixture(claim_taid):
    p = claim_taid.bimodal_teacher_logits().exp()
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-6)
    assert int(p[:10].argmax()) == 4 and int(p[10:].argmax()) + 10 == 15
    # discretised Gaussians of σ = 1.2 at 4 and 15 weighted 0.6 / 0.4: the two peak heights are in ratio 1.5
    # (the other bump adds < 1e-15 at either peak)
    assert float(p[4] / p[15]) == pytest.approx(0.6 / 0.4, rel=1e-6)
    masses = claim_taid.mode_masses(p)
    assert masses["valley"] < 0.002 < 0.35 < masses["mass_B"] < masses["mass_A"]


def test_quadratic_student_starts_as_the_given_gaussian(claim_taid):
    student = claim_taid.QuadraticLogitStudent(8.0, 2.0)
    v = torch.arange(claim_taid.VOCAB, dtype=torch.float32)
    expected = torch.softmax(-((v - 8.0) ** 2) / 8.0, -1)
    torch.testing.assert_close(torch.softmax(student(), -1), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reverse_kl_collapses_and_forward_kl_averages_on_the_toy(claim_taid, seed):
    # RKL sits on the mode next to its start (μ ≈ 8 is nearer token 4); FKL spreads over both and fills the valley.
    rkl = claim_taid.train_toy("rkl", seed, 400)
    fkl = claim_taid.train_toy("fkl", seed, 400)
    assert claim_taid.collapsed(rkl) and rkl["mass_A"] > 0.7 and rkl["mass_B"] < 0.01
    assert not claim_taid.collapsed(fkl) and fkl["valley"] > 0.15
    assert fkl["fkl"] < rkl["fkl"] and rkl["rkl"] < fkl["rkl"]  # each wins on the divergence it minimises


def test_teacher_hacking_quick_prints_every_regime(claim_hacking, capsys):
    assert claim_hacking.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for regime in claim_hacking.REGIMES:
        assert f"\n{regime} " in out
    assert "watch warns" in out


def test_trigram_table_reads_the_context_of_each_position(claim_hacking):
    V = claim_hacking.V
    table = torch.log_softmax(torch.randn(V, V, V, generator=torch.Generator().manual_seed(0)), -1)
    lm = claim_hacking.TrigramTable(table)
    seqs = torch.tensor([[3, 5, 7, 1]])
    out = lm.logits(seqs)
    assert out.shape == (1, 2, V)
    torch.testing.assert_close(out[0, 0], table[3, 5])
    torch.testing.assert_close(out[0, 1], table[5, 7])


def test_count_teacher_is_a_distribution_and_differs_from_its_oracle(claim_hacking):
    oracle = claim_hacking.make_oracle()
    teacher = claim_hacking.fit_teacher(oracle, 200)
    sums = teacher.log_probs.exp().sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    gap = float((oracle.log_probs.exp() * (oracle.log_probs - teacher.log_probs)).sum(-1).mean())
    assert gap > 0 and math.isfinite(gap)


def test_sinkd_quick_runs_both_objectives(capsys):
    claim_sinkd = load_benchmark("claim_sinkd")
    assert claim_sinkd.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert " kd " in out and " kd+sinkhorn " in out and "kd+sinkhorn×10" not in out  # --quick runs two rows
    recipe = claim_sinkd.recipe("kd+sinkhorn", 0, 64, 20, 16, "out")
    # the official scale 1e-3 on Σ Π⊙W, given to potstill's per-row mean over a batch of 32 rows
    assert [o["name"] for o in recipe["objectives"]] == ["forward_kl", "sinkhorn"]
    assert recipe["objectives"][1]["weight"] == pytest.approx(1e-3 * 32)
