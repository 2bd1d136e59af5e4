"""The objective catalogue: every entry is well formed, resolvable and trains on an inference-mode teacher."""

from __future__ import annotations

import inspect

import pytest
import torch
from test_losses import NAMES

from potstill.losses import (
    OBJECTIVES,
    get_objective,
    tvd,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- catalogue -----------------------------------------------------------------------------------------


def test_catalogue_entries():
    hidden = {"hidden_mse", "hidden_cosine", "squarehead", "dmae_align", "mi_alpha"}
    attention = {"attention_kl", "minilm_relations", "attention_mse"}
    stateful = {"taid", "sparse_flops", "moe_router_aux", "dac_kl"} | hidden | attention
    logits = set(NAMES) | {"taid", "sinkhorn", "uld", "gold", "first_token_kl", "dac_kl", "span_correlation",
                           "dcd_logits", "self_judge", "logit_std_kd", "logit_std_js"}
    scores = {"margin_mse", "listwise_kl", "in_batch_margin_mse", "pointwise_mse", "sparse_flops", "dcd_loss"}
    embedding = {"embedding_mse", "embedding_cosine", "embedding_similarity_kl", "further_pretraining_sd"}
    preference = {"dpo_teacher_ref"}
    demo_sets = {"bialign"}
    router = {"moe_router_aux"}
    vision_language = {"vl2v_adip", "vlm_ood_visual_mse", "vlm_ood_visual_contrastive", "vlm_ood_coherence",
                       "vlm_ood_label_ce"}
    graph = {"vqgraph_code_kl"}
    expected = (logits | hidden | attention | scores | embedding | preference | demo_sets | router | vision_language
                | graph)
    assert set(OBJECTIVES) == expected
    for name, info in OBJECTIVES.items():
        assert info.name == name
        assert info.stateful == (name in stateful)
        assert info.stateful or info.fn.__name__ == name
        assert callable(info.fn)
        assert info.formula and "\n" not in info.formula
        assert info.paper
        params = inspect.signature(info.fn).parameters
        assert all(params[k].default == v for k, v in info.defaults.items())
    kinds = {name: info.kind for name, info in OBJECTIVES.items()}
    assert {k for k, v in kinds.items() if v == "logits"} == logits
    assert {k for k, v in kinds.items() if v == "scores"} == scores
    assert {k for k, v in kinds.items() if v == "embedding"} == embedding
    assert {k for k, v in kinds.items() if v == "hidden_states"} == hidden
    assert {k for k, v in kinds.items() if v == "attention"} == attention
    assert {k for k, v in kinds.items() if v == "preference"} == preference
    assert {k for k, v in kinds.items() if v == "router"} == router
    assert {k for k, v in kinds.items() if v == "vision_language"} == vision_language
    assert {k for k, v in kinds.items() if v == "demo_sets"} == demo_sets
    assert {k for k, v in kinds.items() if v == "graph"} == graph
    assert OBJECTIVES["generalized_jsd"].defaults["beta"] == 0.5


def test_get_objective():
    assert get_objective("tvd").fn is tvd
    with pytest.raises(KeyError, match="did you mean.*forward_kl") as info:
        get_objective("forward_kld")
    assert "reverse_kl" in str(info.value)
    with pytest.raises(KeyError, match="valid names"):
        get_objective("zzz")


def test_every_objective_trains_on_an_inference_mode_teacher():
    """The loop hands the teacher's outputs over as `torch.inference_mode` tensors, with no copy: no objective
    may save them for backward (chunked, sparse and fused paths included)."""
    import inspect as _inspect

    from potstill.losses import TopKTeacher, fused_linear_divergence, sparse_version
    from potstill.losses.intermediate import ModelShape

    g = torch.Generator().manual_seed(0)
    shapes = {"logits": (3, 5, 11), "preference": (4, 5, 11), "demo_sets": (4, 5, 11), "embedding": (6, 8),
              "scores": (4, 3)}
    for name, info in OBJECTIVES.items():
        if name in ("sparse_flops", "moe_router_aux"):  # regularisers of the student alone: no teacher output
            continue
        if info.kind in ("hidden_states", "attention"):  # internals: per layer [B, T, D] tensors
            obj = info.fn()
            obj.bind(ModelShape(2, 8, 2), ModelShape(4, 16, 2))
            with torch.inference_mode():
                if info.kind == "hidden_states":
                    teacher = [torch.randn(2, 5, 16, generator=g) for _ in range(5)]
                else:
                    teacher = {i: tuple(torch.randn(2, 5, 16, generator=g) for _ in range(3)) for i in range(4)}
            if info.kind == "hidden_states":
                student = [torch.randn(2, 5, 8, generator=g).requires_grad_(True) for _ in range(3)]
                leaves = student
            else:
                student = {i: tuple(torch.randn(2, 5, 8, generator=g).requires_grad_(True) for _ in range(3))
                           for i in range(2)}
                leaves = [x for v in student.values() for x in v]
            obj(student, teacher, mask=torch.ones(2, 5, dtype=torch.bool)).backward()
            assert any(x.grad is not None for x in leaves), name
            continue
        if info.kind == "vision_language":  # image vectors and the shared class text (VisionLanguageSignal)
            from potstill.signals import VisionLanguageSignal

            with torch.inference_mode():
                image, text = torch.randn(4, 8, generator=g), torch.randn(3, 8, generator=g)
                teacher = VisionLanguageSignal(image @ text.T, image, text)
            s = torch.randn(4, 8, generator=g).requires_grad_(True)
            student = VisionLanguageSignal(s @ text.T.clone(), s, text.clone())
            labels = teacher.logits.argmax(-1)
            kw = {"labels": labels} if "labels" in getattr(info.fn, "batch_fields", {}) else {}
            info.fn(student, teacher, **kw).backward()
            assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0, name
            continue
        if info.kind == "graph":  # node vectors against the teacher's codebook (GraphSignal)
            from potstill.signals import GraphSignal

            with torch.inference_mode():
                teacher = GraphSignal(torch.randn(4, 3, generator=g), torch.randn(4, 8, generator=g),
                                      torch.randn(5, 8, generator=g))
            s = torch.randn(4, 8, generator=g).requires_grad_(True)
            info.fn(GraphSignal(torch.randn(4, 3, generator=g), s), teacher).backward()
            assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0, name
            continue
        shape = shapes[info.kind]
        with torch.inference_mode():
            teacher = torch.randn(shape, generator=g)
            extra = torch.randn(shape[0], generator=g)
        accepts_chunks = "chunk_size" in _inspect.signature(info.fn).parameters
        for chunk_size in (None, 4) if accepts_chunks else (None,):
            s = torch.randn(shape, generator=g).requires_grad_(True)
            kw = {"chunk_size": chunk_size} if chunk_size else {}
            fn = info.fn(**kw) if info.stateful else info.fn  # a stateful objective takes it when built
            if name == "margin_mse":
                out = fn(s[:, 0], s[:, 1:], extra, teacher[:, 1:])
            elif name == "in_batch_margin_mse":  # a square (B, B) in-batch matrix
                out = fn(s[:3], teacher[:3])
            elif name == "dcd_logits":  # (B, C) class logits with gold labels
                out = fn(s[:, 0], teacher[:, 0], labels=torch.tensor([0, 4, 10]))
            elif name == "first_token_kl":  # the task's teacher → student first-token map
                out = fn(s, teacher, first_token_of=torch.randint(-1, shape[-1], (shape[-1],), generator=g), **kw)
            elif info.kind in ("preference", "demo_sets"):  # pair / demo-set rows, scored at their token ids
                out = fn(s, teacher, labels=torch.randint(0, shape[-1], shape[:-1], generator=g))
            else:
                out = fn(s, teacher) if info.stateful else fn(s, teacher, **kw)
            out.backward()
            assert torch.isfinite(s.grad).all(), name
        if sparse_version(name) is not None:
            with torch.inference_mode():
                lp, ids = torch.log_softmax(teacher, -1).topk(4, -1)
                cached = TopKTeacher(ids, lp)
            for chunk_size in (None, 4):
                s = torch.randn(shape, generator=g).requires_grad_(True)
                sparse_version(name)(s, cached, chunk_size=chunk_size).backward()
                assert torch.isfinite(s.grad).all(), name
            h = torch.randn(3, 5, 7, generator=g).requires_grad_(True)
            w = torch.randn(11, 7, generator=g).requires_grad_(True)
            for target in (teacher, cached):
                fused_linear_divergence(h, w, target, divergence=name, chunk_size=4).backward()
            assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all(), name
