"""The loop's fused lm_head (`trainer.fused_lm_head`) and length-grouped batching (`trainer.group_by_length`)."""

from __future__ import annotations

import json

import pytest
import test_causal_lm as lm
import torch
from safetensors.torch import load_file

from potstill.cli import main
from potstill.config import validate_recipe
from potstill.data import length_grouped_order, padding_fraction
from potstill.errors import UserError
from potstill.losses.fused import LMHeadInputs
from potstill.train import run_recipe
from potstill.train.distiller import Distiller
from potstill.train.run import build_objectives

SENTENCES, write_jsonl = lm.SENTENCES, lm.write_jsonl
tok, folders = lm.tok, lm.folders  # module-scoped fixtures: the tiny tokenizer and saved tiny teachers
TEXTS = [f"{a} and {b}" for a in SENTENCES for b in SENTENCES[:4]]


def _weights(summary) -> dict[str, torch.Tensor]:
    return load_file(str(summary["student_dir"] + "/model.safetensors"))


def _losses(run_dir) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _recipe(tmp_path, teacher, name, **trainer):
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    raw = lm.recipe(tmp_path, teacher, data, data, max_steps=4, lr=1e-2, hard_label_weight=0.5,
                    **trainer).model_dump(mode="json")
    raw["name"] = name
    raw["objectives"] = [{"name": "generalized_jsd", "params": {"beta": 0.3, "chunk_size": 7}}]
    return validate_recipe(raw)


# ------------------------------------------------------------------------------------------ fused lm_head


@pytest.mark.parametrize("teacher", ["llama", "gpt2"])
def test_fused_head_trains_like_the_full_logits(tmp_path, folders, teacher):
    """Same losses and weights with and without fused_lm_head: the Llama pair has a padded vocabulary and
    tied embeddings, GPT-2 ties its lm_head too; hard-label CE goes through the fused cross-entropy."""
    plain = run_recipe(_recipe(tmp_path, folders[teacher], "plain"))
    fused = run_recipe(_recipe(tmp_path, folders[teacher], "fused", fused_lm_head=True))
    assert _losses(tmp_path / "runs" / "fused") == pytest.approx(_losses(tmp_path / "runs" / "plain"), rel=1e-5)
    a, b = _weights(plain), _weights(fused)
    for key in a:
        if key.endswith("attn.c_attn.bias"):
            # GPT-2's key bias has a zero gradient (softmax ignores a shift shared by all keys): AdamW turns
            # the rounding noise there into ±lr steps whose signs differ between the two paths. Compare the
            # query and value thirds only.
            width = a[key].numel() // 3
            a[key], b[key] = (torch.cat([x[:width], x[2 * width:]]) for x in (a[key], b[key]))
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    assert fused["table"][-1]["perplexity"] == pytest.approx(plain["table"][-1]["perplexity"], rel=1e-4)


def test_fused_student_signal_is_the_head_input(tmp_path, folders, tok):
    r = _recipe(tmp_path, folders["llama"], "x", fused_lm_head=True)
    task = lm.setup_task(r)
    batch = task.collate(task.train_records[:3], [0, 1, 2])
    signal = task.student_signal(task.student, batch)
    assert isinstance(signal, LMHeadInputs) and signal.vocab_size == len(tok)
    logits = task.logits(task.student, batch)
    torch.testing.assert_close(torch.nn.functional.linear(signal.hidden, signal.weight)[..., :len(tok)], logits)
    head = task.student.get_output_embeddings()
    assert "forward" not in head.__dict__  # the bypass is undone
    assert task.student(input_ids=batch["input_ids"]).logits.shape[-1] == head.out_features


def test_fused_head_with_a_cached_teacher(tmp_path, folders):
    """Cache + fused head: neither the teacher's nor the student's full logits exist in the step."""
    r = _recipe(tmp_path, folders["llama"], "cached")
    raw = r.model_dump(mode="json")
    raw["teacher"]["cache"] = str(tmp_path / "cache")
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))
    assert main(["cache", str(path), "--k", "6"]) == 0
    plain = run_recipe(validate_recipe(raw))
    fused = run_recipe(validate_recipe({**raw, "name": "cached_fused", "trainer": {**raw["trainer"],
                                                                                   "fused_lm_head": True}}))
    assert _losses(tmp_path / "runs" / "cached_fused") == pytest.approx(_losses(tmp_path / "runs" / "cached"),
                                                                        rel=1e-5)
    for key, value in _weights(plain).items():
        torch.testing.assert_close(_weights(fused)[key], value, rtol=1e-4, atol=1e-6)


def test_fused_head_refusals(tmp_path, folders):
    r = _recipe(tmp_path, folders["gpt2"], "x", fused_lm_head=True)
    raw = r.model_dump(mode="json")
    with pytest.raises(UserError, match="objective 'taid' has no fused form"):
        validate_recipe({**raw, "objectives": [{"name": "taid"}]})
    factory = {**raw, "teacher": {"factory": "test_causal_lm:factory_lm", "tokenizer": str(folders["gpt2"])},
               "student": {"init": "factory", "factory": "test_causal_lm:factory_lm", "kwargs": {"seed": 1}}}
    with pytest.raises(UserError, match="fused_lm_head needs a Hugging Face causal LM student"):
        lm.setup_task(validate_recipe(factory))
    digits = {"task": "classification", "teacher": {"factory": "x:y"}, "student": {"init": "factory", "factory": "x:y"},
              "data": {"train": "builtin:digits"}, "objectives": [{"name": "forward_kl"}],
              "trainer": {"fused_lm_head": True}}
    with pytest.raises(UserError, match="fused_lm_head is for the causal_lm task"):
        validate_recipe(digits)


def test_fused_head_refuses_post_processed_logits(tmp_path, folders):
    r = _recipe(tmp_path, folders["llama"], "x", fused_lm_head=True)
    from potstill.tasks import build_task

    task = build_task(r, run_dir=r.run_dir)
    real_raw_logits = type(task)._raw_logits

    def soft_capped(self, model, ids, mask):  # a model that post-processes its logits (Gemma-2 style)
        return 3.0 * torch.tanh(real_raw_logits(self, model, ids, mask) / 3.0)

    task._raw_logits = soft_capped.__get__(task)
    with pytest.raises(UserError, match="not its hidden states times its lm_head"):
        task.setup()


# ------------------------------------------------------------------------------------------ length grouping


def test_length_grouped_order_keeps_windows_and_lowers_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (1000,), generator=g).tolist()
    order = torch.randperm(1000, generator=g)
    grouped = length_grouped_order(order, lengths, 8, window=10, generator=torch.Generator().manual_seed(1))
    assert sorted(grouped.tolist()) == list(range(1000))
    for start in range(0, 1000, 80):  # every record stays in its window of 10 batches
        assert set(grouped[start:start + 80].tolist()) == set(order[start:start + 80].tolist())
    for start in range(0, 992, 8):  # a batch is a run of the window's length-sorted records
        batch = [lengths[i] for i in grouped[start:start + 8].tolist()]
        window = sorted((lengths[i] for i in order[start // 80 * 80:start // 80 * 80 + 80].tolist()), reverse=True)
        want = sorted(batch, reverse=True)
        assert any(window[j:j + 8] == want for j in range(0, len(window) - 7))
    assert padding_fraction(grouped.tolist(), lengths, 8) < 0.15 < 0.4 < padding_fraction(order.tolist(), lengths, 8)
    again = length_grouped_order(order, lengths, 8, window=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(grouped, again)
    tail = length_grouped_order(order[:13], lengths, 4, window=2, generator=torch.Generator().manual_seed(1))
    assert sorted(tail.tolist()) == sorted(order[:13].tolist())
    with pytest.raises(ValueError, match="lengths has 5 entries"):
        length_grouped_order(order, lengths[:5], 8)


def test_group_by_length_batches_similar_lengths_in_the_loop(tmp_path, folders):
    rows = [{"text": " ".join(SENTENCES[: 1 + i % 7])} for i in range(64)]
    data = write_jsonl(tmp_path / "v.jsonl", rows)
    r = lm.recipe(tmp_path, folders["gpt2"], data, max_steps=4, batch_size=4, group_by_length=True,
                  data={"max_length": 64})
    distiller = Distiller(lm.build_task(r, run_dir=r.run_dir), build_objectives(r), r.trainer, run_dir=r.run_dir)
    used = []
    pick = distiller._micro_batch_indices

    def spy(global_mb):
        used.append(pick(global_mb))
        return used[-1]

    distiller._micro_batch_indices = spy
    distiller.fit()
    lengths = distiller.task.record_lengths()
    assert len(used) == 4 and max(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in used) <= 12
    plain = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    assert padding_fraction(distiller._perm.tolist(), lengths, 4) < 0.5 * padding_fraction(plain, lengths, 4)


def test_group_by_length_needs_lengths(tmp_path, digits_recipe):
    raw = {**digits_recipe, "trainer": {**digits_recipe["trainer"], "group_by_length": True, "max_steps": 1}}
    with pytest.raises(UserError, match="group_by_length: the classification task's records have no token length"):
        run_recipe(validate_recipe(raw))
