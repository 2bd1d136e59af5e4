"""A sparse mixture-of-experts student in the causal_lm task, and its router auxiliary loss (`moe_router_aux`).

LLaVA-MoD (Shu et al. 2024) distils a dense teacher into a sparse MoE student with KD + LM cross-entropy + the
router load-balancing loss. The student is built from a config (`student.init: from_config` with
`student.config.model_type: mixtral` or `qwen2_moe`, next to a dense teacher: `potstill.tasks.lm_models`); with
the objective `moe_router_aux` in the recipe the student runs with `output_router_logits=True`, and both models'
signals are `Signals` whose `router_logits` (the student's) the objective reads (`potstill.losses.moe`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from potstill.errors import UserError
from potstill.signals import Signals

EXPERTS_PER_TOKEN = ("num_experts_per_tok", "moe_topk", "top_k")


def router_objective_params(recipe: Any) -> list[tuple[int, dict]]:
    """(position, params) of the recipe's `router` objectives (moe_router_aux)."""
    from potstill.losses.catalogue import OBJECTIVES

    return [(i, o.params) for i, o in enumerate(recipe.objectives)
            if o.name in OBJECTIVES and OBJECTIVES[o.name].kind == "router"]


def check_router_student(recipe: Any, student: nn.Module) -> None:
    """Refuse moe_router_aux with a dense student, with a top_k other than the student's experts per token, or
    next to objectives on hidden states / attention (the recipe schema refuses it with trainer.fused_lm_head)."""
    from potstill.losses.catalogue import INTERNAL_KINDS, OBJECTIVES

    config = getattr(student, "config", None)
    top_k = next((getattr(config, name) for name in EXPERTS_PER_TOKEN if isinstance(getattr(config, name, None),
                                                                                    int)), None)
    for i, params in router_objective_params(recipe):
        if top_k is None:
            raise UserError(f"field objectives.{i}.name: moe_router_aux needs a mixture-of-experts student (e.g. "
                            f"student.init: from_config with student.config.model_type: mixtral or qwen2_moe); "
                            f"the student is a {type(student).__name__}")
        if params.get("top_k", 2) != top_k:
            raise UserError(f"field objectives.{i}.params.top_k: the student routes each token to {top_k} experts; "
                            f"set top_k: {top_k}")
    for i, o in enumerate(recipe.objectives):
        if o.name in OBJECTIVES and OBJECTIVES[o.name].kind in INTERNAL_KINDS:
            raise UserError(f"field objectives.{i}.name: {o.name} does not combine with moe_router_aux yet")


def router_signals(model: nn.Module, batch: dict[str, Any], vocab_size: int) -> Signals:
    """The MoE student's logits (cut to `vocab_size`) with its router logits, over the batch's real tokens."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                output_router_logits=True)
    logits = out.logits[..., :vocab_size] if out.logits.shape[-1] != vocab_size else out.logits
    router = getattr(out, "router_logits", None)
    return Signals(main=logits, token_mask=batch["attention_mask"].bool(),
                   router_logits=tuple(router) if router is not None else None)


def teacher_signals(logits: Any, batch: dict[str, Any]) -> Signals:
    """The teacher's logits (or its cached top-k, a `TopKTeacher`) as `Signals`, with no router logits:
    moe_router_aux reads the student's only."""
    return Signals(main=logits, token_mask=batch["attention_mask"].bool())
