"""Self-distillation for further pre-training (Lee et al. 2023): the [CLS] loss against hand-computed values, the
masked_lm task's masking, and the two pre-training stages on tiny BERTs built from configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from potstill.losses import further_pretraining_sd, get_objective


def test_loss_sums_squares_over_dims_and_averages_over_rows():
    student = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    # rows: 1² + 2² = 5 and 3² + 4² = 25
    assert further_pretraining_sd(student, teacher).item() == pytest.approx(15.0)
    assert further_pretraining_sd(student, teacher, reduction="sum").item() == pytest.approx(30.0)
    assert further_pretraining_sd(student, teacher, reduction="none").tolist() == pytest.approx([5.0, 25.0])
    mask = torch.tensor([False, True])
    assert further_pretraining_sd(student, teacher, mask=mask).item() == pytest.approx(25.0)
    assert further_pretraining_sd(student, teacher, mask=mask, reduction="none").tolist() == [0.0, 25.0]


def test_only_the_student_gets_gradients():
    student = torch.tensor([[1.0, 2.0], [0.5, -1.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0], [0.5, 1.0]], requires_grad=True)
    further_pretraining_sd(student, teacher).backward()
    assert teacher.grad is None
    # d/ds of (1/B) Σ ‖s − t‖² = 2 (s − t) / B, B = 2
    assert student.grad.flatten().tolist() == pytest.approx([1.0, 1.0, 0.0, -2.0])


def test_loss_refuses_mismatched_widths_and_bad_reduction():
    with pytest.raises(ValueError, match="same shape"):
        further_pretraining_sd(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="reduction"):
        further_pretraining_sd(torch.zeros(2, 3), torch.zeros(2, 3), reduction="avg")


def test_catalogue_lists_it_as_an_embedding_objective():
    info = get_objective("further_pretraining_sd")
    assert info.kind == "embedding" and "Lee et al. 2023" in info.paper and not info.stateful


# ---- the masked_lm task on tiny BERTs

TEXTS = ["the match ended in a draw after extra time", "shares fell sharply on the stock market today",
         "a new phone was announced with a larger screen", "the minister spoke about the budget in parliament",
         "the film won three awards at the festival", "the striker scored twice in the second half"]


def _tiny_mlm(folder: Path) -> Path:
    """θ0: a seeded 2-layer BertForMaskedLM, 32 wide, with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    assets = pytest.importorskip("potstill.assets")
    try:
        tok = AutoTokenizer.from_pretrained(assets.minilm_path())
    except Exception as err:  # the offline MiniLM package (its tokenizer) is an optional asset
        pytest.skip(f"MiniLM tokenizer unavailable: {err}")
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _recipe(tmp_path: Path, *, name: str, teacher: Path, student: Path, objectives: list, steps: int = 4) -> dict:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"{t} ({i})"}) + "\n" for i, t in enumerate(TEXTS * 2)))
    return {"name": name, "output_dir": str(tmp_path / "runs"), "task": "masked_lm", "seed": 0,
            "teacher": {"path": str(teacher)}, "student": {"init": "pretrained", "path": str(student)},
            "data": {"train": str(train), "eval": str(train), "max_length": 16}, "objectives": objectives,
            "trainer": {"max_steps": steps, "batch_size": 4, "lr": 1e-3, "hard_label_weight": 1.0, "log_every": 1,
                        "num_threads": 1, "warmup_ratio": 0.0},
            "eval": {"compare_before": False, "throughput": False}}


@pytest.fixture(scope="module")
def theta0(tmp_path_factory) -> Path:
    return _tiny_mlm(tmp_path_factory.mktemp("theta0"))


def _task(tmp_path: Path, theta0: Path):
    from potstill.config import validate_recipe
    from potstill.tasks import build_task

    recipe = validate_recipe(_recipe(tmp_path, name="t", teacher=theta0, student=theta0, objectives=[]))
    task = build_task(recipe, run_dir=tmp_path / "run")
    task.setup()
    return task


def test_masking_is_seeded_and_never_picks_special_or_padding_tokens(tmp_path, theta0):
    task = _task(tmp_path, theta0)
    batch = task.collate([{"text": t} for t in TEXTS], list(range(len(TEXTS))))
    a, b, c = task.mask(batch, 1), task.mask(batch, 1), task.mask(batch, 2)
    assert torch.equal(a["masked_ids"], b["masked_ids"]) and torch.equal(a["mlm_labels"], b["mlm_labels"])
    assert not torch.equal(a["mlm_labels"], c["mlm_labels"])
    chosen = a["mlm_labels"] != -100
    assert chosen.any()
    assert not (chosen & batch["special_tokens_mask"].bool()).any()
    assert torch.equal(a["mlm_labels"][chosen], batch["input_ids"][chosen])  # labels are the original tokens
    # unchosen tokens are left as they were
    assert torch.equal(a["masked_ids"][~chosen], batch["input_ids"][~chosen])


def test_masking_shares_follow_the_bert_recipe(tmp_path, theta0):
    task = _task(tmp_path, theta0)
    ids = torch.full((200, 100), 2000)
    batch = {"input_ids": ids, "special_tokens_mask": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids)}
    out = task.mask(batch, 0)
    chosen = out["mlm_labels"] != -100
    assert chosen.float().mean().item() == pytest.approx(0.15, abs=0.01)
    as_mask = (out["masked_ids"] == task.tokenizer.mask_token_id) & chosen
    kept = (out["masked_ids"] == 2000) & chosen
    assert as_mask.sum().item() / chosen.sum().item() == pytest.approx(0.8, abs=0.03)
    assert kept.sum().item() / chosen.sum().item() == pytest.approx(0.1, abs=0.03)


def test_masking_config_refuses_shares_over_one():
    from potstill.config import MaskingConfig

    with pytest.raises(ValueError, match="mask_replace_prob"):
        MaskingConfig(mask_replace_prob=0.8, random_replace_prob=0.3)


def test_two_stages_further_pretrain_then_self_distil(tmp_path, theta0):
    from potstill.config import validate_recipe
    from potstill.train.run import run_recipe

    stage1 = run_recipe(validate_recipe(_recipe(tmp_path, name="stage1", teacher=theta0, student=theta0,
                                                objectives=[])))
    phi = tmp_path / "runs" / "stage1" / "student"
    assert (phi / "config.json").is_file() and "mlm_loss" in json.dumps(stage1)
    run_recipe(validate_recipe(_recipe(tmp_path, name="stage2", teacher=phi, student=theta0,
                                       objectives=[{"name": "further_pretraining_sd"}])))
    rows = [json.loads(line) for line in (tmp_path / "runs" / "stage2" / "metrics.jsonl").read_text().splitlines()]
    terms = [r["obj/further_pretraining_sd"] for r in rows if "obj/further_pretraining_sd" in r]
    assert terms and terms[0] > 0  # θ0 ≠ φ: the term is positive at step 0
    from transformers import AutoModelForMaskedLM

    student = AutoModelForMaskedLM.from_pretrained(tmp_path / "runs" / "stage2" / "student")
    assert student.cls is not None  # saved with its MLM head
