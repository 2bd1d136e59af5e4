"""MGSR in the causal-LM loop: SCRG on the on-policy path (`mgsr.scrg`) and a run with its objectives."""

from __future__ import annotations

import json
import math

import pytest
import test_causal_lm as lm
import yaml

from potstill.config import load_recipe
from potstill.data.lm_records import prompt_of
from potstill.data.sampling import SamplingSettings, sample_completions
from potstill.errors import UserError
from potstill.tasks import build_task
from potstill.train import run_recipe

tok, folders = lm.tok, lm.folders  # module-scoped fixtures: the tiny tokenizer and saved tiny teachers
ROWS = [{"prompt": " ".join(s.split()[:2]), "completion": " " + " ".join(s.split()[2:])} for s in lm.SENTENCES]


@pytest.fixture
def raw(tmp_path, folders):
    data = lm.write_jsonl(tmp_path / "pc.jsonl", ROWS)
    return {"name": "mgsr", "output_dir": str(tmp_path / "runs"), "task": "causal_lm", "seed": 0,
            "teacher": {"path": str(folders["gpt2"])},
            "student": {"init": "layers_from_teacher", "layers": [0, 2]},
            "data": {"train": {"path": data}, "eval": {"path": data}, "max_length": 32},
            "objectives": [{"name": "dac_kl", "params": {"top_n": 8, "hidden": 8}},
                           {"name": "span_correlation", "weight": 0.5, "params": {"span_length": 3}}],
            "generation": {"lmbda": 1.0, "max_new_tokens": 6, "temperature": 1.0}, "mgsr": {"scrg": True},
            "trainer": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "log_every": 1, "num_threads": 1,
                        "save_every": 0},
            "eval": {"throughput": False, "compare_before": False}}


def _write(tmp_path, raw):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_scrg_revises_the_on_policy_samples_after_their_first_error(tmp_path, raw):
    recipe = load_recipe(_write(tmp_path, raw))
    task = build_task(recipe, run_dir=recipe.run_dir)
    task.setup()
    idx = [0, 3]
    batch = task.collate([task.train_records[i] for i in idx], idx)
    out = task.prepare_batch(batch, task.student, micro_batch=5)
    assert out["on_policy"]
    seed = (0 * 1_000_003 + 5) * 1_009
    prompts = [prompt_of(task.train_records[i]) for i in idx]
    plain = sample_completions(task.student, prompts, settings=SamplingSettings(6, 1.0), pad_token_id=task.pad_id,
                               eos_token_id=task.tokenizer.eos_token_id, seed=seed)
    for b, (prompt, sampled) in enumerate(zip(prompts, plain, strict=True)):
        revised = [t for t in out["targets"][b].tolist() if t != -100]
        assert out["input_ids"][b, :len(prompt)].tolist() == prompt
        assert 0 < len(revised) <= len(sampled)
        # the revision keeps a prefix of the student's own sample and then differs at most from the error on
        first_diff = next((j for j, (x, y) in enumerate(zip(revised, sampled, strict=False)) if x != y), None)
        if first_diff is not None:
            assert revised[:first_diff] == sampled[:first_diff]


def test_an_mgsr_run_trains_the_clipping_network_with_the_student(tmp_path, raw):
    summary = run_recipe(load_recipe(_write(tmp_path, raw)))
    assert math.isfinite(summary["final_loss"])
    lines = [json.loads(x) for x in (tmp_path / "runs" / "mgsr" / "metrics.jsonl").read_text().splitlines()]
    masses = [line["state/dac_kl.kept_mass"] for line in lines if "state/dac_kl.kept_mass" in line]
    assert masses and all(0.0 < m <= 1.0 for m in masses)  # the clipping network's band, logged each step


def test_scrg_needs_on_policy_samples(tmp_path, raw):
    with pytest.raises(UserError, match="mgsr.scrg revises"):
        load_recipe(_write(tmp_path, dict(raw, generation={"lmbda": 0.0})))
