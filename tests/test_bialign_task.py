"""BiAlign through `potstill run`: ICL records in the causal_lm task (data.format: icl), on the toy recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import fit_until_crash
from safetensors.torch import load_file

from potstill.config import load_recipe
from potstill.errors import UserError
from potstill.losses import forward_kl
from potstill.losses.bialign import bialign, demo_set_scores
from potstill.tasks import build_task
from potstill.tasks.causal_lm_icl import DemoSetLogits, kendall_tau
from potstill.train import build_objectives, run_recipe
from potstill.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "bialign-toy.yaml"
POOL = [{"input": "k1", "output": "v3"}, {"input": "k2", "output": "v3"}, {"input": "k5", "output": "v7"}]
GIVEN = [[{"input": "k1", "output": "v3"}], [{"input": "k4", "output": "v9"}, {"input": "k2", "output": "v3"}]]


def recipe(tmp_path: Path, *overrides: str):
    """The toy recipe, made quick: a teacher pretrained 5 steps, 16 training queries, 8 held-out ones."""
    return load_recipe(RECIPE, [f"output_dir={tmp_path / 'runs'}", "teacher.kwargs.steps=5", "data.train.limit=16",
                                "data.eval.limit=8", "trainer.max_steps=2", "trainer.log_every=1", *overrides])


def setup_task(r):
    task = build_task(r, run_dir=r.run_dir)
    task.setup()
    return task


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return setup_task(recipe(tmp_path_factory.mktemp("toy")))


def test_collate_gives_m_rows_per_query_with_the_target_scored(toy) -> None:
    assert toy.train_format == "icl"
    batch = toy.collate(toy.train_records[:2], [0, 1])
    assert batch["input_ids"].shape[0] == 2 * 4  # B = 2 queries × M = 4 demo sets
    lines = RECIPE.parent.joinpath("bialign-toy", "train.jsonl").read_text().splitlines()
    for row in range(8):
        record = json.loads(lines[row // 4])
        ids = [t for t, m in zip(batch["input_ids"][row].tolist(), batch["attention_mask"][row].tolist(),
                                 strict=True) if m]
        words = toy.tokenizer.convert_ids_to_tokens(ids)
        # 3 demos (key, label) of the pool, the query, then the target: the last position is not scored
        assert len(words) == 3 * 2 + 2 and words[6:] == [record["query"], record["target"]]
        assert {(words[2 * d], words[2 * d + 1]) for d in range(3)} <= {(p["input"], p["output"])
                                                                        for p in record["pool"]}
        assert [t for t in batch["targets"][row].tolist() if t != -100] == [toy.tokenizer.vocab[record["target"]]]
    assert toy.count_rows(batch) == 8  # one answer token per variant
    again = toy.collate(toy.train_records[:2], [0, 1])  # a later epoch or a resumed run: the same strings
    assert torch.equal(again["input_ids"], batch["input_ids"])


def test_run_path_loss_equals_the_python_api_on_one_batch(tmp_path) -> None:
    r = recipe(tmp_path)
    task = setup_task(r)
    batch = task.to_device(task.collate(task.train_records[:3], [0, 1, 2]))
    teacher, student = task.teacher_signal(batch), task.student_signal(task.student, batch)
    assert isinstance(teacher, DemoSetLogits) and teacher.scores.shape == (3, 4)
    assert torch.equal(teacher.scores, demo_set_scores(teacher.logits, batch["targets"]).view(3, 4))
    (objective,) = build_objectives(r, task)
    loop_loss = objective(student, teacher, task.signal_mask(batch), batch) / task.count_rows(batch)
    api_loss = bialign(student.logits, teacher.logits, labels=batch["targets"], num_sets=4, rank_weight=0.03,
                       margin=0.01)
    assert loop_loss.item() == pytest.approx(api_loss.item(), rel=1e-6)
    assert api_loss.item() > 0


def test_forward_kl_reads_every_variant_and_the_hard_label_term_too(tmp_path) -> None:
    r = recipe(tmp_path, "objectives=[{name: forward_kl}]", "trainer.hard_label_weight=1.0")
    task = setup_task(r)
    batch = task.to_device(task.collate(task.train_records[:2], [0, 1]))
    teacher, student = task.teacher_signal(batch), task.student_signal(task.student, batch)
    (objective,) = build_objectives(r, task)
    mask = batch["targets"] != -100
    expected = forward_kl(student.logits, teacher.logits, mask=mask, reduction="sum")
    assert objective(student, teacher, task.signal_mask(batch), batch).item() == pytest.approx(expected.item())
    ce = torch.nn.functional.cross_entropy(student.logits[mask], batch["targets"][mask], reduction="sum")
    assert task.hard_label_loss(student, batch).item() == pytest.approx(ce.item(), rel=1e-6)


def test_given_demo_sets_are_used_as_they_are(tmp_path) -> None:
    rows = [{"query": "k0", "target": "v3", "demo_sets": GIVEN}]
    train = write_jsonl(tmp_path / "given.jsonl", rows)
    task = setup_task(recipe(tmp_path, f"data.train={{path: {train}}}", "data.eval=null", "data.icl.num_sets=2"))
    batch = task.collate(task.train_records, [0])
    prompts = [task.tokenizer.decode([t for t in row if t]) for row in batch["input_ids"].tolist()]
    assert prompts == ["k1 v3 k0 v3", "k4 v9 k2 v3 k0 v3"]


def test_bialign_on_records_without_demo_sets_is_one_line_naming_the_field(tmp_path) -> None:
    train = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "k1 v3 k0", "completion": " v3"}])
    with pytest.raises(UserError, match=r"^field objectives\.0\.name: bialign ranks demonstration sets; it needs "
                                        r"data\.format: icl[^\n]*$"):
        setup_task(recipe(tmp_path, f"data.train={{path: {train}}}", "data.eval=null", "data.format=auto"))


@pytest.mark.parametrize(("override", "message"), [
    ("objectives.0.params.num_sets=4", r"field objectives\.0\.params\.num_sets: bialign has no parameter"),
    ("data.packing=true", r"field data\.packing: ICL records"),
    ("objectives=[{name: taid}]", r"field objectives\.0\.name: with ICL records"),
])
def test_what_icl_records_do_not_combine_with_is_refused(tmp_path, override, message) -> None:
    with pytest.raises(UserError, match=message):
        setup_task(recipe(tmp_path, override))


def test_malformed_icl_records_name_the_record(tmp_path) -> None:
    rows = [{"query": "k0", "target": "v3", "pool": POOL}, {"query": "k0", "target": "v3", "demo_sets": GIVEN}]
    train = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError, match=r"data\.train, record 1: 'demo_sets' must be a list of 4"):
        setup_task(recipe(tmp_path, f"data.train={{path: {train}}}", "data.eval=null"))
    long = write_jsonl(tmp_path / "long.jsonl", rows[:1])
    with pytest.raises(UserError, match=r"record 0: a prompt with its demonstrations is 8 tokens, more than "
                                        r"data\.max_length = 6"):
        setup_task(recipe(tmp_path, f"data.train={{path: {long}}}", "data.eval=null", "data.max_length=6"))


def test_kendall_tau_by_hand() -> None:
    a = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [1.0, 3.0, 2.0]])
    b = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    # row 2: pairs (0,1) concordant, (0,2) concordant, (1,2) discordant → (2 − 1) / 3
    assert kendall_tau(a, b).tolist() == pytest.approx([1.0, -1.0, 1 / 3])


def test_metrics_and_an_interrupted_run_resumes_bit_identical(tmp_path) -> None:
    """The toy recipe end to end for 4 steps, and the same run killed in step 3 (checkpoint of step 2) and resumed."""
    straight = recipe(tmp_path, "name=straight", "trainer.max_steps=4", "trainer.save_every=2")
    summary = run_recipe(straight)
    after = summary["table"][-1]
    assert {"answer_accuracy", "demo_set_tau", "kl_to_teacher"} <= set(after)
    assert -1.0 <= after["demo_set_tau"] <= 1.0

    halted = recipe(tmp_path, "name=halted", "trainer.max_steps=4", "trainer.save_every=2")
    fit_until_crash(halted, 3, KeyboardInterrupt)
    assert ckpt.latest_checkpoint(halted.run_dir / "checkpoints") is not None
    run_recipe(halted, resume=True)
    a = load_file(str(straight.run_dir / "student" / "model.safetensors"))
    b = load_file(str(halted.run_dir / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_recipe_tokenizer_gives_the_toy_models_ids() -> None:
    from transformers import AutoTokenizer

    from potstill.examples.icl_labels import VOCAB

    tok = AutoTokenizer.from_pretrained(RECIPE.parent / "bialign-toy" / "tokenizer")
    assert len(tok) == len(VOCAB) == 33 and tok.pad_token_id == 0
    assert tok("k3 v9 k0", add_special_tokens=False).input_ids == [VOCAB["k3"], VOCAB["v9"], VOCAB["k0"]] == [4, 26, 1]
