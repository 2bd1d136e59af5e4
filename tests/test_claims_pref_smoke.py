"""The claim scripts of issue #21 §2 and §9 (benchmarks/claim_dpo_teacher_ref.py, claim_teacher_guidance.py) on
short paths end to end, plus facts of their toys that hold by construction."""

from __future__ import annotations

import random

import torch
from conftest import load_benchmark


def test_teacher_guidance_prints_every_run(capsys):
    threads = torch.get_num_threads()
    try:
        assert load_benchmark("claim_teacher_guidance").main(["--seeds", "0", "--steps", "2", "--cs", "0.1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for run in ("α = 0", "α = 1 (plain KRR)", "α* held-out", "α* ground truth (oracle)"):
        assert f"\n{run} " in out
    assert "beats both" in out


def test_dpo_pairs_differ_in_one_term_and_chosen_continues_the_progression():
    claim = load_benchmark("claim_dpo_teacher_ref")
    pairs = claim.make_pairs([(3, 2)], 5, random.Random(0))
    for pair in pairs:
        assert pair["prompt"] == "n3 n5 n7 n9" and pair["chosen"] == " n11 n13 n15"
        chosen, rejected = pair["chosen"].split(), pair["rejected"].split()
        assert sum(a != b for a, b in zip(chosen, rejected, strict=True)) == 1


def test_dpo_claim_runs(capsys):
    threads = torch.get_num_threads()
    try:
        claim = load_benchmark("claim_dpo_teacher_ref")
        assert claim.main(["--seeds", "0", "--steps", "3", "--teacher-steps", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for model in ("teacher", "mimic", "dpo", "mimic + dpo", "mimic → dpo"):
        assert f"\n{model} " in out
