"""Distillation losses: logit divergences, TAID, Sinkhorn, ranking losses, embedding losses, and their catalogue.

Torch only; nothing here imports the rest of potstill.
"""

from .catalogue import OBJECTIVES, ObjectiveInfo, get_objective
from .divergences import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    soft_cross_entropy,
    tvd,
)
from .embedding import embedding_cosine, embedding_mse
from .ranking import listwise_kl, margin_mse
from .sinkhorn import sinkhorn, sinkhorn_plan
from .taid import TAID

__all__ = [
    "OBJECTIVES",
    "TAID",
    "ObjectiveInfo",
    "embedding_cosine",
    "embedding_mse",
    "forward_kl",
    "generalized_jsd",
    "get_objective",
    "listwise_kl",
    "margin_mse",
    "reverse_kl",
    "sinkhorn",
    "sinkhorn_plan",
    "skew_kl",
    "skew_reverse_kl",
    "soft_cross_entropy",
    "tvd",
]
