"""The router load-balancing loss of a sparse mixture-of-experts student (`moe_router_aux`).

Fedus et al. 2021, "Switch Transformers" (eq. 4–6), as the auxiliary loss of LLaVA-MoD's dense → sparse mimic
stage (Shu et al. 2024: KD + LM cross-entropy + router auxiliary loss, coefficient 0.01, 4 experts, top-2).
With E experts, router logits r_{l,n} over the counted tokens n of every MoE layer l (N·L rows in all),
p = softmax(r) and S_{l,n} the top-k experts of row (l, n):

    f_e = (1 / (N·L)) Σ_{l,n} [e ∈ S_{l,n}]         (share of routing choices that go to expert e, summed over k)
    P_e = (1 / (N·L)) Σ_{l,n} p_{l,n,e}             (mean router probability of expert e)
    L_aux = E · Σ_e f_e · P_e

Perfectly balanced routing gives L_aux = k (its minimum over balanced choices); routing every token to the same k
experts with certainty gives E. This is the value transformers' Mixtral / Qwen2-MoE return as `aux_loss`
(`output_router_logits=True`), computed here from the router logits so that it follows potstill's masks and
reductions. The loop divides an objective on internals by the real input tokens, so with reduction "sum" the
value is L_aux times the counted tokens: the loop's division gives back L_aux. Default weight in recipes: 0.01.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


def router_load_balance(router_logits: Tensor | Sequence[Tensor], *, top_k: int = 2, mask: Tensor | None = None,
                        reduction: str = "mean") -> Tensor:
    """L_aux of the module docstring. `router_logits`: one `[N, E]` tensor per MoE layer (or a stacked
    `[L, N, E]`), rows in the order of `mask`'s flattened `[B, T]` (True = counted token); `reduction` "mean"
    is L_aux, "sum" L_aux times the counted tokens. Float32."""
    layers = list(router_logits) if not isinstance(router_logits, Tensor) or router_logits.dim() == 3 \
        else [router_logits]
    if not layers:
        raise ValueError("router_load_balance needs the router logits of at least one MoE layer")
    experts = layers[0].shape[-1]
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be between 1 and the number of experts ({experts}), got {top_k}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' (one value per batch), got {reduction!r}")
    keep = None if mask is None else mask.reshape(-1).bool()
    choices = torch.zeros(experts, dtype=torch.float32, device=layers[0].device)
    probs = torch.zeros(experts, dtype=torch.float32, device=layers[0].device)
    rows = 0
    for logits in layers:
        logits = logits.reshape(-1, experts).float()
        if keep is not None:
            if keep.numel() != logits.shape[0]:
                raise ValueError(f"mask has {keep.numel()} tokens, the router logits {logits.shape[0]} rows")
            logits = logits[keep.to(logits.device)]
        p = logits.softmax(-1)
        chosen = p.topk(top_k, dim=-1).indices
        choices = choices + torch.zeros_like(p).scatter_(1, chosen, 1.0).sum(0)
        probs = probs + p.sum(0)
        rows += logits.shape[0]
    if rows == 0:
        return probs.sum() * 0.0
    value = experts * (choices / rows * probs / rows).sum()
    tokens = rows // len(layers)
    return value * tokens if reduction == "sum" else value


class RouterLoadBalance(nn.Module):
    """`moe_router_aux` as an objective on the student's internals: reads the student's router logits (the task
    runs its MoE student with `output_router_logits`), not the teacher's; `top_k` = the student's experts per token
    (`num_experts_per_tok`). Holds no state."""

    signal = "router_logits"
    unit = "tokens"

    def __init__(self, *, top_k: int = 2) -> None:
        super().__init__()
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a whole number >= 1, got {top_k!r}")
        self.top_k = top_k

    def bind(self, student: Any, teacher: Any) -> None:
        return None

    def needs(self) -> dict[str, list[int]]:
        return {}

    def forward(self, student: Sequence[Tensor] | None, teacher: Any = None, *, mask: Tensor | None = None,
                reduction: str = "sum") -> Tensor:
        if student is None:
            raise ValueError("moe_router_aux reads the student's router logits; the student gave none (is it a "
                             "mixture-of-experts model such as Mixtral or Qwen2-MoE?)")
        return router_load_balance(student, top_k=self.top_k, mask=mask, reduction=reduction)
