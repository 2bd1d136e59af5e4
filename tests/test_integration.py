"""End-to-end runs: digits KD vs labels only, MiniLM embedding distillation, 2-process Accelerate."""

from __future__ import annotations

import json

import torch
from conftest import REPO, accelerate_launch, write_yaml
from safetensors.torch import load_file

from potstill.config import load_recipe, validate_recipe
from potstill.train import run_recipe


def test_digits_kd_beats_labels_only(tmp_path):
    """Forward KL at T=4 from the MLP teacher agrees with it more than the same student trained on labels."""
    common = [f"output_dir={tmp_path}", "eval.throughput=false", "eval.every=0", "trainer.save_every=0",
              "trainer.num_threads=1"]
    kd = load_recipe(REPO / "recipes" / "digits.yaml", common + ["name=kd"])
    labels = load_recipe(REPO / "recipes" / "digits.yaml",
                         common + ["name=labels", "objectives=[]", "trainer.hard_label_weight=1"])
    kd_after = run_recipe(kd)["table"][-1]
    labels_after = run_recipe(labels)["table"][-1]
    assert kd_after["agreement"] > labels_after["agreement"]
    assert kd_after["agreement"] > 0.9


MINILM = {
    "name": "minilm",
    "task": "embedding",
    "teacher": {"path": "builtin:minilm"},
    "student": {"init": "layers_from_teacher", "layers": [0, 3]},
    "data": {"train": {"path": "builtin:bbc-sentences", "split": "train", "limit": 96},
             "eval": {"path": "builtin:bbc-sentences", "split": "test", "limit": 48}, "max_length": 32},
    "objectives": [{"name": "embedding_mse", "params": {"normalize": True}}],
    "trainer": {"max_steps": 12, "batch_size": 16, "lr": 2e-4, "log_every": 1, "warmup_steps": 0,
                "schedule": "constant"},
    "eval": {"throughput": False, "compare_before": True},
}


def test_minilm_embedding_distillation_lowers_loss_and_saves_st_model(tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    recipe = validate_recipe(dict(MINILM, output_dir=str(tmp_path)))
    summary = run_recipe(recipe)
    losses = [json.loads(x)["loss"] for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    before, after = summary["table"][1], summary["table"][2]
    assert after["cosine_to_teacher"] > before["cosine_to_teacher"]
    # the saved folder loads with sentence-transformers and matches mean pooling of the HF weights
    student_dir = recipe.run_dir / "student"
    st = SentenceTransformer(str(student_dir), device="cpu")
    texts = ["Shares rose sharply after the results.", "The striker scored twice."]
    got = torch.tensor(st.encode(texts))
    tok, model = AutoTokenizer.from_pretrained(student_dir), AutoModel.from_pretrained(student_dir)
    assert model.config.num_hidden_layers == 2
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, then the teacher's Normalize module
    torch.testing.assert_close(got, torch.nn.functional.normalize(pooled, dim=-1), rtol=1e-4, atol=1e-5)
    # teacher embeddings were cached once, with a manifest
    manifest = json.loads((recipe.run_dir / "teacher_cache" / "manifest.json").read_text())
    assert manifest["rows"] == 96 and len(manifest["sha256"]) == 64


def test_accelerate_cpu_flag_starts_two_processes(tmp_path, digits_recipe):
    """`accelerate launch --cpu --num_processes 2` alone starts one process; potstill restarts as two (gloo)."""
    raw = dict(digits_recipe, name="cpu2", trainer={**digits_recipe["trainer"], "batch_size": 4, "max_steps": 2})
    proc = accelerate_launch(tmp_path, write_yaml(tmp_path / "cpu2.yaml", raw), "--cpu", port=29561)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting 2 with torch.distributed.run" in proc.stderr
    run = tmp_path / "runs" / "cpu2"
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    assert (run / "checkpoints" / "step-00000002" / "rng-rank1.pt").is_file()
    assert (run / "student" / "model.safetensors").is_file()


def test_two_process_accelerate_run(tmp_path, digits_recipe):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine trains with gloo, writes one
    student, and matches one process with twice the batch."""
    raw = dict(digits_recipe, trainer={**digits_recipe["trainer"], "batch_size": 4, "max_steps": 6,
                                       "save_every": 3})
    proc = accelerate_launch(tmp_path, write_yaml(tmp_path / "ddp.yaml", dict(raw, name="ddp")), "--multi_gpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert sorted(p.name for p in (run / "student").iterdir()) == ["README.md", "model.safetensors",
                                                                    "potstill_student.json"]
    assert (run / "checkpoints" / "step-00000006" / "rng-rank1.pt").is_file()
    single = validate_recipe(dict(raw, name="single", trainer={**raw["trainer"], "batch_size": 8}))
    run_recipe(single)
    a, b = load_file(str(run / "student" / "model.safetensors")), load_file(
        str(single.run_dir / "student" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
