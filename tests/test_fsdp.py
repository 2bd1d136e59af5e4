"""Sharded training with FSDP2 (`trainer.distributed: fsdp`, `potstill.train.fsdp`): 2 processes on CPU over gloo
with a tiny Llama student and teacher built from configs, against 1 process; SIGKILL and resume; the settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_yaml
from safetensors.torch import load_file

from potstill.errors import UserError
from potstill.train import checkpoint as ckpt
from potstill.train.fsdp import FSDPSettings, check_fsdp_run, fsdp_settings

CONFIG = REPO / "docs" / "accelerate" / "fsdp2.yaml"
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "what is two plus two", "two plus two is four",
         "the bird sang a song in the tree", "my friend reads a book every night", "rain fell on the old roof",
         "the sun rose over the hill"]


def test_settings_come_from_the_recipe_or_the_accelerate_config():
    assert fsdp_settings("ddp", 2, env={}) is None
    assert fsdp_settings("fsdp", 2, env={}) == FSDPSettings(reshard_after_forward=True)
    assert fsdp_settings("fsdp", 1, env={}) is None  # one process: nothing to shard
    launched = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}
    assert fsdp_settings("ddp", 2, env=launched) == FSDPSettings(reshard_after_forward=False)
    with pytest.raises(UserError, match="fsdp_version: 2"):
        fsdp_settings("ddp", 2, env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})


def test_options_the_sharded_loop_does_not_handle_are_refused(tmp_path):
    from potstill.config import validate_recipe

    raw = _recipe(tmp_path, tmp_path / "teacher", tmp_path / "train.jsonl", name="x")
    check_fsdp_run(validate_recipe(raw))  # the plain recipe is accepted
    for field, value, message in (("trainer", {"early_stopping": {"metric": "perplexity", "mode": "min"}},
                                   "trainer.early_stopping"),
                                  ("trainer", {"mixed_precision": "fp16"}, "trainer.mixed_precision: fp16"),
                                  ("generation", {"lmbda": 0.5}, "generation.lmbda")):
        bad = dict(raw, **{field: {**raw.get(field, {}), **value}})
        with pytest.raises(UserError, match=message.replace(".", r"\.")):
            check_fsdp_run(validate_recipe(bad))


def test_the_documented_accelerate_config_asks_for_fsdp2():
    import yaml

    config = yaml.safe_load(CONFIG.read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2


# ----------------------------------------------------------------------------------- 2 processes (gloo)


PIECES = """
import sys, torch, torch.distributed as dist
from torch import nn
from potstill.train.fsdp import FSDPSettings, Sharding, clip_grad_norm, load_sharded, save_sharded
from potstill.train.precision import close_process_group
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, out = dist.get_rank(), sys.argv[1]

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))

class Task:  # what Sharding.shard reads
    student, teacher = build(), None

x = torch.arange(16.0).reshape(4, 4) / 10 + rank  # each rank its own rows
plain = build()
for r in range(2):  # the whole batch on one module: the mean over ranks of each rank's mean loss
    (plain(torch.arange(16.0).reshape(4, 4) / 10 + r).pow(2).mean() / 2).backward()
expected_norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.05)
sharding = Sharding(FSDPSettings(), is_main=rank == 0, device=torch.device("cpu"))
student = sharding.shard(Task)
student(x).pow(2).mean().backward()  # FSDP2 averages the gradients over the ranks
norm = clip_grad_norm(list(student.parameters()), [], 0.05)
whole_grads = [p.grad.full_tensor() for p in student.parameters()]
optimizer = torch.optim.AdamW(student.parameters(), lr=0.1)
optimizer.step()
save_sharded(__import__("pathlib").Path(out) / "ck", student, optimizer)
saved = {k: v.full_tensor().clone() for k, v in student.state_dict().items()}
optimizer.step()  # move away, then come back
load_sharded(__import__("pathlib").Path(out) / "ck", student, optimizer)
back = {k: v.full_tensor() for k, v in student.state_dict().items()}
whole = sharding.whole_student(student)
if rank == 0:
    torch.save({"norm": norm, "expected_norm": float(expected_norm), "grads": whole_grads,
                "expected_grads": [p.grad for p in plain.parameters()],
                "same_after_load": all(torch.equal(saved[k], back[k]) for k in saved),
                "whole": {k: v.clone() for k, v in whole.state_dict().items()}, "saved": saved,
                "whole_type": type(whole).__name__}, out + "/result.pt")
close_process_group()
sys.stdout.flush()
__import__("os")._exit(0)  # no interpreter finalization, as potstill.cli ends a multi-process run
"""


def test_sharded_pieces_on_two_processes(tmp_path):
    """2 gloo processes shard a 2-layer MLP: `clip_grad_norm` gives the norm of the whole averaged gradient and
    scales the DTensor gradients as clipping the unsharded module does (torch's clip_grads_with_norm_ does not
    scale them); `save_sharded` / `load_sharded` bring back the exact weights after a further step; and
    `Sharding.whole_student` gathers a plain module with those weights on the main process."""
    script = tmp_path / "pieces.py"
    script.write_text(PIECES)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29579", str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    assert result["norm"] == pytest.approx(result["expected_norm"], rel=1e-5) and result["norm"] > 0.05
    for got, want in zip(result["grads"], result["expected_grads"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert result["same_after_load"] and result["whole_type"] == "Sequential"
    for key, value in result["saved"].items():
        assert torch.equal(result["whole"][key], value), key


def _models(folder: Path) -> Path:
    """A tiny 2-layer Llama teacher (tied embeddings) with a byte-level BPE tokenizer trained here."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).parent))
    from test_causal_lm import make_tokenizer

    tok = make_tokenizer(TEXTS)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, initializer_range=0.3, tie_word_embeddings=True,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _recipe(tmp_path: Path, teacher: Path, train: Path, *, name: str, **trainer) -> dict:
    return {"name": name, "output_dir": str(tmp_path / "runs"), "task": "causal_lm", "seed": 0,
            "teacher": {"path": str(teacher)}, "student": {"init": "layers_from_teacher", "layers": [0]},
            "data": {"train": str(train), "eval": str(train), "max_length": 16},
            "objectives": [{"name": "forward_kl"}],
            "trainer": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "log_every": 1, "num_threads": 1,
                        "distributed": "fsdp", **trainer},
            "eval": {"throughput": False, "compare_before": False}}


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    teacher = _models(root / "teacher")
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"{a}, {b}"}) + "\n" for a in TEXTS for b in TEXTS[:2]))
    return root, teacher, train


def _launch(cwd: Path, recipe: Path, *args: str, port: int, wait: bool = True):
    """`accelerate launch --config_file docs/accelerate/fsdp2.yaml -m potstill run RECIPE` (2 processes, gloo)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
           "--main_process_port", str(port), "-m", "potstill", "run", str(recipe), *args]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=cwd)


def _losses(run: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def test_two_sharded_processes_match_one_process(lm_setup):
    """2 FSDP2 processes × batch 4 take the steps of 1 process × batch 8: the same losses and final weights (to
    float32 reduction-order noise: the sharded sums run in another order), a sharded checkpoint (one file per
    process, no whole student), and a student folder that plain transformers loads."""
    from transformers import AutoModelForCausalLM

    from potstill.config import validate_recipe
    from potstill.train import run_recipe

    root, teacher, train = lm_setup
    recipe = write_yaml(root / "fsdp.yaml", _recipe(root, teacher, train, name="fsdp", save_every=2))
    proc = _launch(root, recipe, port=29581)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = root / "runs" / "fsdp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sharded"] is True
    step = run / "checkpoints" / "step-00000004"
    assert sorted(p.name for p in (step / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (step / "student.safetensors").exists() and json.loads((step / "state.json").read_text())["sharded"]

    single = validate_recipe(_recipe(root, teacher, train, name="single", batch_size=8, distributed="ddp"))
    single_summary = run_recipe(single)
    assert _losses(run) == pytest.approx(_losses(single.run_dir), rel=1e-5)
    a = load_file(str(run / "student" / "model.safetensors"))
    b = load_file(str(single.run_dir / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert summary["table"][-1]["perplexity"] == pytest.approx(single_summary["table"][-1]["perplexity"], rel=1e-4)
    student = AutoModelForCausalLM.from_pretrained(run / "student")
    assert student.config.num_hidden_layers == 1 and student.config.tie_word_embeddings


def test_sigkill_and_resume_of_a_sharded_run_gives_identical_weights(lm_setup):
    """SIGKILL every process of a 2-process FSDP2 run (the launcher, torchrun and both ranks) once it has written
    a checkpoint; `--resume` ends with exactly the weights and losses of an uninterrupted sharded run."""
    import psutil

    root, teacher, train = lm_setup
    raw = _recipe(root, teacher, train, name="ref", max_steps=200, save_every=10, keep_last=2, log_every=10)
    done = _launch(root, write_yaml(root / "ref.yaml", raw), port=29583)
    assert done.returncode == 0, done.stderr[-3000:]
    victim = write_yaml(root / "victim.yaml", dict(raw, name="victim"))
    checkpoints = root / "runs" / "victim" / "checkpoints"
    proc = _launch(root, victim, port=29585, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not ckpt.list_checkpoints(checkpoints):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before its first checkpoint"
    launcher = psutil.Process(proc.pid)
    for process in [launcher, *launcher.children(recursive=True)]:  # torchrun starts the ranks in their own groups
        process.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = [s for s, _ in ckpt.list_checkpoints(checkpoints)]
    assert killed_at and max(killed_at) < 200 and not (root / "runs" / "victim" / "summary.json").exists()
    resumed = _launch(root, victim, "--resume", port=29587)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    a = load_file(str(root / "runs" / "ref" / "student" / "model.safetensors"))
    b = load_file(str(root / "runs" / "victim" / "student" / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(root / "runs" / "ref") == _losses(root / "runs" / "victim")


# ------------------------------------------------------------------------------------ the top-k cache by ranks


def test_rank_parts_join_into_one_cache(tmp_path):
    """Two ranks' parts (records 0, 2 and 1, one row each, k = 2 of 3 ids) join into one cache whose index is
    sorted by record, whose shards are the ranks' own files, and which reads back each record's rows."""
    from potstill.teachers.cache import TopKCache
    from potstill.teachers.cache_merge import merge_rank_parts, rank_part_dir
    from potstill.teachers.cache_writer import TopKCacheWriter

    out = tmp_path / "cache"
    logits = {0: [[2.0, 1.0, 0.0]], 1: [[0.0, 3.0, 1.0]], 2: [[0.0, 0.0, 5.0], [1.0, 0.0, 0.0]]}
    for rank, records in ((0, (0, 2)), (1, (1,))):
        with TopKCacheWriter(rank_part_dir(out, rank), k=2, temperature=1.0, vocab_size=3, meta={"t": 1}) as w:
            for record in records:
                w.add(record, torch.tensor(logits[record]))
    manifest = merge_rank_parts([rank_part_dir(out, 0), rank_part_dir(out, 1)], out)
    assert manifest["ranks"] == 2 and manifest["num_records"] == 3 and manifest["num_tokens"] == 4
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert [s["num_records"] for s in manifest["shards"]] == [2, 1]
    assert not rank_part_dir(out, 0).exists() and not rank_part_dir(out, 1).exists()
    cache = TopKCache(out, expect={"t": 1})
    assert cache.records == [0, 1, 2]
    rows = cache.get([1, 2])
    assert rows.ids[0, 0].tolist() == [1, 2] and rows.ids[1, 0].tolist() == [2, 0] and rows.ids[1, 1].tolist()[0] == 0
    # record 1: log-softmax of (0, 3, 1) at ids 1 and 2 = 3 − log(1 + e³ + e), 1 − log(1 + e³ + e)
    lse = torch.logsumexp(torch.tensor([0.0, 3.0, 1.0]), 0)
    torch.testing.assert_close(rows.logprobs[0, 0], torch.stack([3.0 - lse, 1.0 - lse]), atol=8e-3, rtol=0)


@pytest.mark.slow
def test_two_sharded_processes_write_the_cache_of_one_process(lm_setup, tmp_path):
    """`accelerate launch --config_file fsdp2.yaml -m potstill cache` (teacher sharded, 2 ranks): each rank writes
    its own shard; the joined cache holds the rows a single process writes (to float16 storage and float32
    reduction-order noise), and a sharded run trains from it."""
    from potstill.cli import main
    from potstill.teachers.cache import TopKCache

    root, teacher, train = lm_setup
    raw = _recipe(tmp_path, teacher, train, name="cached", max_steps=2)
    raw["teacher"]["cache"] = str(tmp_path / "cache2")
    recipe = write_yaml(tmp_path / "cached.yaml", raw)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
                           "--main_process_port", "29589", "-m", "potstill", "cache", str(recipe), "--k", "8",
                           "--batch-size", "4"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["cache", str(recipe), "--k", "8", "--batch-size", "4", "--out", str(tmp_path / "cache1")]) == 0
    two, one = TopKCache(tmp_path / "cache2"), TopKCache(tmp_path / "cache1")
    assert two.manifest["ranks"] == 2 and len(two.manifest["shards"]) == 2
    assert two.meta == one.meta and two.records == one.records == list(range(16))
    a, b = two.get(list(range(16))), one.get(list(range(16)))
    assert torch.equal(a.ids[..., :4], b.ids[..., :4])  # the 4 likeliest ids; later ones may swap on near-ties
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=2e-3, rtol=0)
    run = _launch(tmp_path, recipe, port=29591)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "runs" / "cached" / "summary.json").read_text())["sharded"] is True
