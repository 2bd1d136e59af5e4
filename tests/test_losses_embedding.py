"""embedding_similarity_kl (SEED's in-batch similarity distillation) against an independent float64 reference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_losses import close, logits_pair, random_mask

from potstill.losses import OBJECTIVES, embedding_cosine, embedding_mse, embedding_similarity_kl

torch.set_num_threads(1)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).sum(-1, keepdims=True))


def _reference_rows(student, teacher, tau_s, tau_t, *, exclude_diagonal=False, cross=False, keep=None):
    """Per counted row KL(p_i ‖ q_i), with explicit loops in float64."""
    s, t = _unit(student.double().numpy()), _unit(teacher.double().numpy())
    rows = [i for i in range(len(s)) if keep is None or keep[i]]
    out = {}
    for i in rows:
        cols = [j for j in rows if not (exclude_diagonal and j == i)]
        if not cols:
            out[i] = 0.0
            continue
        t_logits = [float(t[i] @ t[j]) / tau_t for j in cols]
        s_logits = [float(s[i] @ (t[j] if cross else s[j])) / tau_s for j in cols]
        t_max, s_max = max(t_logits), max(s_logits)
        t_norm = t_max + math.log(sum(math.exp(v - t_max) for v in t_logits))
        s_norm = s_max + math.log(sum(math.exp(v - s_max) for v in s_logits))
        kl = 0.0
        for a, b in zip(t_logits, s_logits, strict=True):
            log_p, log_q = a - t_norm, b - s_norm
            kl += math.exp(log_p) * (log_p - log_q)
        out[i] = kl
    return out


def _batch(b=6, d_s=5, d_t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d_s, generator=g), torch.randn(b, d_t, generator=g)


@pytest.mark.parametrize("exclude_diagonal", [False, True])
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("temps", [(0.05, None), (0.2, 0.1), (1.0, 0.5)])
def test_matches_float64_reference(exclude_diagonal, cross, temps):
    tau_s, tau_t = temps
    s, t = _batch()
    ref = _reference_rows(s, t, tau_s, tau_s if tau_t is None else tau_t, exclude_diagonal=exclude_diagonal,
                          cross=cross)
    kw = dict(temperature=tau_s, teacher_temperature=tau_t, exclude_diagonal=exclude_diagonal, cross=cross)
    rows = embedding_similarity_kl(s, t, reduction="none", **kw)
    assert rows.dtype == torch.float32 and rows.shape == (6,)
    want = torch.tensor([ref[i] for i in range(6)], dtype=torch.float64)
    torch.testing.assert_close(rows.double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(embedding_similarity_kl(s, t, reduction="sum", **kw).double(), want.sum(),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(embedding_similarity_kl(s, t, **kw).double(), want.mean(), rtol=1e-4, atol=1e-5)


def test_width_free_default_form_and_defaults():
    s, t = _batch(d_s=3, d_t=8)
    ref = _reference_rows(s, t, 0.05, 0.05)
    torch.testing.assert_close(embedding_similarity_kl(s, t).double(),
                               torch.tensor(sum(ref.values()) / 6, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    assert OBJECTIVES["embedding_similarity_kl"].kind == "embedding"
    assert OBJECTIVES["embedding_similarity_kl"].defaults == {
        "temperature": 0.05, "teacher_temperature": None, "exclude_diagonal": False, "cross": False,
        "reduction": "mean"}


@pytest.mark.parametrize("exclude_diagonal", [False, True])
def test_masked_rows_are_neither_rows_nor_columns(exclude_diagonal):
    s, t = _batch(b=7)
    keep = torch.tensor([True, False, True, True, False, True, True])
    # garbage in the masked rows must not matter
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[~keep], t_bad[~keep] = 1e6, float("nan")
    ref = _reference_rows(s, t, 0.1, 0.1, exclude_diagonal=exclude_diagonal, keep=keep.tolist())
    kw = dict(mask=keep, temperature=0.1, exclude_diagonal=exclude_diagonal)
    rows = embedding_similarity_kl(s_bad, t_bad, reduction="none", **kw)
    want = torch.tensor([ref.get(i, 0.0) for i in range(7)], dtype=torch.float64)
    torch.testing.assert_close(rows.double(), want, rtol=1e-4, atol=1e-5)
    assert rows[~keep].eq(0).all()
    mean = embedding_similarity_kl(s_bad, t_bad, **kw)
    torch.testing.assert_close(mean.double(), want.sum() / 5, rtol=1e-4, atol=1e-5)
    # the same as dropping those rows from the batch
    torch.testing.assert_close(mean, embedding_similarity_kl(s[keep], t[keep], temperature=0.1,
                                                             exclude_diagonal=exclude_diagonal))


def test_all_masked_and_single_row():
    s, t = _batch(b=3)
    none = torch.zeros(3, dtype=torch.bool)
    assert embedding_similarity_kl(s, t, mask=none).item() == 0.0
    assert embedding_similarity_kl(s, t, mask=none, reduction="sum").item() == 0.0
    one = torch.tensor([False, True, False])
    for exclude in (False, True):
        assert embedding_similarity_kl(s, t, mask=one, exclude_diagonal=exclude).item() == 0.0


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("exclude_diagonal", [False, True])
def test_zero_when_student_equals_teacher(cross, exclude_diagonal):
    _, t = _batch()
    loss = embedding_similarity_kl(t.clone(), t, cross=cross, exclude_diagonal=exclude_diagonal)
    assert abs(loss.item()) < 1e-5
    # scale does not matter: both sides are L2-normalised
    assert abs(embedding_similarity_kl(3 * t, t, cross=cross, exclude_diagonal=exclude_diagonal).item()) < 1e-5


@pytest.mark.parametrize("cross", [False, True])
def test_gradients_finite_and_loss_decreases(cross):
    s, t = _batch(b=8, d_s=6, d_t=6, seed=1)
    s = s.requires_grad_(True)
    mask = torch.tensor([True] * 7 + [False])
    loss = embedding_similarity_kl(s, t, mask=mask, cross=cross, teacher_temperature=1e-4, temperature=0.2)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad[~mask].eq(0).all()
    student = torch.nn.Parameter(torch.randn(8, 6, generator=torch.Generator().manual_seed(2)))
    opt = torch.optim.SGD([student], lr=0.5)
    first = None
    for _ in range(30):
        opt.zero_grad()
        value = embedding_similarity_kl(student, t, cross=cross, temperature=0.1)
        first = value.item() if first is None else first
        value.backward()
        opt.step()
    assert value.item() < first


def test_input_checks():
    s, t = _batch(d_s=4, d_t=8)
    with pytest.raises(ValueError, match="cross=True .* widths must match"):
        embedding_similarity_kl(s, t, cross=True)
    with pytest.raises(ValueError, match="same batch"):
        embedding_similarity_kl(s[:3], t)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        embedding_similarity_kl(s[None], t[None])
    with pytest.raises(ValueError, match="temperature"):
        embedding_similarity_kl(s, t, temperature=0)
    with pytest.raises(ValueError, match="temperature"):
        embedding_similarity_kl(s, t, teacher_temperature=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        embedding_similarity_kl(s, t, reduction="avg")
    with pytest.raises(ValueError, match="mask"):
        embedding_similarity_kl(s, t, mask=torch.ones(5, dtype=torch.bool))


def test_through_projected_loss():
    """The embedding task wraps embedding objectives in ProjectedLoss; a narrower student gets a projection,
    which the cross form needs and the width-free form tolerates."""
    from potstill.losses.intermediate import ModelShape, ProjectedLoss

    s, t = _batch(d_s=4, d_t=8)
    for cross in (False, True):
        loss = ProjectedLoss(embedding_similarity_kl, cross=cross, temperature=0.1)
        loss.bind(ModelShape(layers=2, hidden=4, heads=2), ModelShape(layers=2, hidden=8, heads=2))
        assert loss.projection is not None
        value = loss(s, t, mask=torch.ones(6, dtype=torch.bool))
        value.backward()
        assert torch.isfinite(value) and loss.projection.weight.grad is not None


def test_runs_in_a_tiny_embedding_recipe(tmp_path):
    """A narrow student distilled with the relational objective through run_recipe (projection + cross form)."""
    from conftest import embedding_recipe, numbered_texts_jsonl, tiny_bert_encoder
    from test_tasks import TOPICS

    from potstill.config import validate_recipe
    from potstill.train import run_recipe

    folder = tiny_bert_encoder(tmp_path / "encoder", num_hidden_layers=2)
    data = numbered_texts_jsonl(tmp_path / "texts.jsonl", [t for texts in TOPICS.values() for t in texts] * 4)
    recipe = validate_recipe(embedding_recipe(
        tmp_path, folder, data, name="seed", eval_data=data,
        student={"init": "from_config", "config": {"num_hidden_layers": 1, "hidden_size": 16}},
        objectives=[{"name": "embedding_similarity_kl", "params": {"cross": True, "temperature": 0.1}}],
        max_steps=3, lr=3e-3, log_every=1))
    summary = run_recipe(recipe)
    assert summary["table"]
    log = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in log if "loss" in x]
    assert len(steps) == 3 and all(math.isfinite(x["obj/embedding_similarity_kl"]) for x in steps)


# --- embeddings ----------------------------------------------------------------------------------------


def test_embedding_mse():
    s, t = logits_pair((10, 24), seed=40)
    close(embedding_mse(s, t), F.mse_loss(s, t))
    close(embedding_mse(s, t, reduction="none"), ((s - t) ** 2).mean(-1))
    close(embedding_mse(s, t, reduction="sum"), ((s - t) ** 2).mean(-1).sum())
    close(embedding_mse(s, t, normalize=True), F.mse_loss(F.normalize(s, dim=-1), F.normalize(t, dim=-1)))
    mask = random_mask((10,), seed=41)
    close(embedding_mse(s, t, mask=mask), F.mse_loss(s[mask], t[mask]))
    s3, t3 = logits_pair((2, 5, 8), seed=42)
    close(embedding_mse(s3, t3), F.mse_loss(s3, t3))
    assert embedding_mse(s.bfloat16(), t.bfloat16()).dtype == torch.float32


def test_embedding_cosine():
    s, t = logits_pair((10, 24), seed=43)
    rows = 1 - F.cosine_similarity(s.double(), t.double(), dim=-1)
    close(embedding_cosine(s, t, reduction="none"), rows)
    close(embedding_cosine(s, t), rows.mean())
    close(embedding_cosine(s, t, reduction="sum"), rows.sum())
    close(embedding_cosine(s, s.clone() * 3.0), torch.tensor(0.0), atol=1e-6)
    mask = random_mask((10,), seed=44)
    close(embedding_cosine(s, t, mask=mask), rows[mask].mean())


def test_embedding_errors():
    s = torch.randn(4, 8)
    for fn in (embedding_mse, embedding_cosine):
        with pytest.raises(ValueError, match="projection"):
            fn(s, torch.randn(4, 16))
        with pytest.raises(ValueError, match=r"\(4, 8\).*\(5, 8\)"):
            fn(s, torch.randn(5, 8))
        with pytest.raises(ValueError, match="reduction"):
            fn(s, s, reduction="max")
