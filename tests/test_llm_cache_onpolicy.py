"""Causal-LM teacher cache (`potstill cache` → `teacher.cache`), on-policy (λ) and sequence-level KD."""

from __future__ import annotations

import json
import math

import pytest
import test_causal_lm as lm
import yaml

from potstill.cli import main
from potstill.config import load_recipe
from potstill.data.lm_records import prompt_of
from potstill.data.sampling import SamplingSettings, sample_completions
from potstill.errors import UserError
from potstill.tasks import build_task
from potstill.train import run_recipe

SENTENCES, write_jsonl = lm.SENTENCES, lm.write_jsonl
tok, folders = lm.tok, lm.folders  # the tiny tokenizer and saved tiny teachers (module-scoped fixtures)
ROWS = [{"prompt": " ".join(s.split()[:2]), "completion": " " + " ".join(s.split()[2:])} for s in SENTENCES]


@pytest.fixture
def raw(tmp_path, folders):
    data = write_jsonl(tmp_path / "pc.jsonl", ROWS)
    return {"name": "lm", "output_dir": str(tmp_path / "runs"), "task": "causal_lm", "seed": 0,
            "teacher": {"path": str(folders["gpt2"]), "cache": str(tmp_path / "cache")},
            "student": {"init": "layers_from_teacher", "layers": [0, 2]},
            "data": {"train": {"path": data}, "eval": {"path": data}, "max_length": 32},
            "objectives": [{"name": "forward_kl"}],
            "trainer": {"max_steps": 3, "batch_size": 2, "lr": 1e-3, "log_every": 1, "num_threads": 1,
                        "save_every": 0},
            "eval": {"throughput": False, "compare_before": False}}


def _write(tmp_path, raw, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)]


def test_cache_with_all_ids_trains_like_the_live_teacher(tmp_path, raw, tok):
    path = _write(tmp_path, raw)
    assert main(["cache", str(path), "--k", str(len(tok))]) == 0
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["num_records"] == len(ROWS) and manifest["k"] == len(tok)
    assert manifest["meta"]["teacher"] == str(raw["teacher"]["path"])
    cached = run_recipe(load_recipe(path))
    live_raw = dict(raw, name="live", teacher={"path": raw["teacher"]["path"]})
    live = run_recipe(load_recipe(_write(tmp_path, live_raw, "live.yaml")))
    # k = V: the sparse divergence is the dense one; only the float16 storage of the log-probs differs
    for a, b in zip(_losses(tmp_path / "runs" / "lm"), _losses(tmp_path / "runs" / "live"), strict=True):
        assert a == pytest.approx(b, rel=2e-3)
    assert cached["table"][-1]["kl_to_teacher"] == pytest.approx(live["table"][-1]["kl_to_teacher"], rel=2e-2)


def test_cache_at_small_k_trains_and_is_smaller(tmp_path, raw):
    assert main(["cache", str(_write(tmp_path, raw)), "--k", "4"]) == 0
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["bytes_per_token"] == 4 * 4 + 4
    summary = run_recipe(load_recipe(tmp_path / "r.yaml"))
    assert all(math.isfinite(x) and x >= 0 for x in _losses(tmp_path / "runs" / "lm"))
    assert summary["table"][-1]["kl_to_teacher"] > 0


def test_cache_sweeps_a_killed_attempts_leftovers_and_refuses_a_second_writer(tmp_path, raw, capsys):
    import subprocess
    import sys

    path = _write(tmp_path, raw)
    stale = tmp_path / ".cache.k3x9_q2a.tmp"  # what a `potstill cache` killed mid-write leaves beside the target
    (stale / "sub").mkdir(parents=True)
    (stale / "shard-00000.safetensors").write_bytes(b"half")
    other = tmp_path / ".cachex.abcdefgh.tmp"  # another target's temp folder is not touched
    other.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from potstill.lockfile import hold\n"
                               "with hold(sys.argv[1], what='x'):\n print('held', flush=True); time.sleep(60)",
                               str(tmp_path / ".cache.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["cache", str(path), "--k", "4"]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert f"cache {tmp_path / 'cache'}" in capsys.readouterr().err
    assert stale.exists() and not (tmp_path / "cache").exists()
    assert main(["cache", str(path), "--k", "4"]) == 0
    assert not stale.exists() and other.exists() and (tmp_path / "cache" / "manifest.json").is_file()


def test_mismatched_cache_and_objectives_are_refused(tmp_path, raw):
    path = _write(tmp_path, raw)
    assert main(["cache", str(path), "--k", "4"]) == 0
    # other data than the cache was built from
    other = dict(raw, data={**raw["data"], "train": {"path": raw["data"]["train"]["path"], "limit": 5}})
    with pytest.raises(UserError, match="data_sha256: cached '.*', expected") as err:
        run_recipe(load_recipe(_write(tmp_path, other, "other.yaml")))
    assert "num_records" not in str(err.value) or "data_sha256" in str(err.value)
    # a loss temperature the cache was not built at
    hot = dict(raw, objectives=[{"name": "forward_kl", "params": {"temperature": 2.0}}])
    with pytest.raises(UserError, match=r"objectives.0.params.temperature: 2, .*potstill cache --temperature 2"):
        run_recipe(load_recipe(_write(tmp_path, hot, "hot.yaml")))
    # an objective that needs full logits
    with pytest.raises(UserError, match="objectives.0.name: sinkhorn needs the teacher's full logits"):
        run_recipe(load_recipe(_write(tmp_path, dict(raw, objectives=[{"name": "sinkhorn"}]), "s.yaml")))
    # a shard damaged after writing
    shard = next((tmp_path / "cache").glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        run_recipe(load_recipe(path), overwrite=True)
    # the CLI says where the cache goes, and needs a causal_lm recipe
    no_cache = dict(raw, teacher={"path": raw["teacher"]["path"]})
    assert main(["cache", str(_write(tmp_path, no_cache, "nc.yaml"))]) == 2


def test_on_policy_batches_hold_the_students_samples(tmp_path, raw):
    raw = dict(raw, teacher={"path": raw["teacher"]["path"]},
               generation={"lmbda": 1.0, "max_new_tokens": 5, "temperature": 1.0})
    recipe = load_recipe(_write(tmp_path, raw))
    task = build_task(recipe, run_dir=recipe.run_dir)
    task.setup()
    idx = [0, 3]
    batch = task.collate([task.train_records[i] for i in idx], idx)
    out = task.prepare_batch(batch, task.student, micro_batch=7)
    assert out["on_policy"]
    seed = (0 * 1_000_003 + 7) * 1_009
    prompts = [prompt_of(task.train_records[i]) for i in idx]
    expected = sample_completions(task.student, prompts, settings=SamplingSettings(5, 1.0), pad_token_id=task.pad_id,
                                  eos_token_id=task.tokenizer.eos_token_id, seed=seed)
    for b, (prompt, completion) in enumerate(zip(prompts, expected, strict=True)):
        n = len(prompt) + len(completion)
        assert out["input_ids"][b, :n].tolist() == prompt + completion
        counted = [t for t in out["targets"][b].tolist() if t != -100]
        assert counted == completion  # loss only on the sampled tokens
    # λ = 0 leaves the dataset's completion; a whole on-policy run trains and finishes
    task.recipe.generation.lmbda = 0.0
    assert task.prepare_batch(batch, task.student, 7) is batch
    summary = run_recipe(load_recipe(_write(tmp_path, dict(raw, generation={**raw["generation"], "lmbda": 0.5}))))
    assert math.isfinite(summary["final_loss"])


def test_on_policy_needs_a_live_teacher(tmp_path, raw):
    with pytest.raises(UserError, match="generation.lmbda > 0 needs a live teacher"):
        load_recipe(_write(tmp_path, dict(raw, generation={"lmbda": 0.5})))


def test_seq_kd_trains_on_teacher_completions_stored_once(tmp_path, raw):
    gen = {"seq_kd": True, "max_new_tokens": 4, "temperature": 0}
    live = dict(raw, teacher={"path": raw["teacher"]["path"]}, generation=gen)
    recipe = load_recipe(_write(tmp_path, live))
    task = build_task(recipe, run_dir=recipe.run_dir)
    task.setup()
    stored = json.loads((recipe.run_dir / "seq_kd_completions.json").read_text())
    prompts = [prompt_of(ex) for ex in task.train_records]
    greedy = sample_completions(task.teacher, prompts, settings=SamplingSettings(4, 0), pad_token_id=task.pad_id,
                                eos_token_id=task.tokenizer.eos_token_id, seed=0)
    assert stored["completions"] == greedy
    for ex, completion in zip(task.train_records, greedy, strict=True):
        assert [t for t in ex["targets"] if t != -100] == completion
    # with a cache, the completions are generated by `potstill cache` and stored inside it
    cached = dict(raw, generation=gen)
    path = _write(tmp_path, cached, "c.yaml")
    assert main(["cache", str(path), "--k", "4"]) == 0
    assert json.loads((tmp_path / "cache" / "seq_kd_completions.json").read_text())["completions"] == greedy
    assert math.isfinite(run_recipe(load_recipe(path))["final_loss"])
    changed = dict(cached, name="changed", generation={**gen, "max_new_tokens": 3})
    with pytest.raises(UserError, match="seq-KD completions were generated for other"):
        run_recipe(load_recipe(_write(tmp_path, changed, "changed.yaml")))


def test_cached_teacher_rows_align_across_two_processes(tmp_path, raw, folders):
    """2 processes × batch 2 read the same cached rows as 1 process × batch 4: same student weights (the Llama
    teacher: no dropout, so both runs compute the same thing; its vocabulary is also padded). The 2-process run
    also uses the fused lm_head, so DDP's gradient sync through the bypassed head is checked too."""
    import torch
    from conftest import accelerate_launch
    from safetensors.torch import load_file

    raw = dict(raw, teacher={**raw["teacher"], "path": str(folders["llama"])})
    path = _write(tmp_path, raw)
    assert main(["cache", str(path), "--k", "8"]) == 0
    two = _write(tmp_path, dict(raw, name="two", trainer={**raw["trainer"], "fused_lm_head": True}), "two.yaml")
    proc = accelerate_launch(tmp_path, two, "--multi_gpu", port=29563)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = load_recipe(_write(tmp_path, dict(raw, name="one", trainer={**raw["trainer"], "batch_size": 4}), "1.yaml"))
    run_recipe(one)
    a = load_file(str(tmp_path / "runs" / "two" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "runs" / "one" / "student" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
