"""Distillation losses: logit divergences (dense and top-k sparse), TAID, Sinkhorn, ranking and embedding
losses, and their catalogue.

Torch only; nothing here imports the rest of potstill.
"""

from .catalogue import OBJECTIVES, ObjectiveInfo, get_objective
from .divergences import (
    forward_kl,
    generalized_jsd,
    js_divergence,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    soft_cross_entropy,
    tvd,
)
from .embedding import embedding_cosine, embedding_mse, embedding_similarity_kl
from .first_token_kl import first_token_kl, first_token_kl_topk
from .further_pretraining import further_pretraining_sd
from .fused import fused_linear_divergence
from .logit_standardization import logit_std_js, logit_std_kd, standardize_logits
from .mgsr_dac_kl import DACKL, dac_kl
from .mgsr_span import span_correlation
from .ranking import flops, idf_flops, in_batch_margin_mse, listwise_kl, margin_mse, pointwise_mse
from .self_judge import expected_score, self_judge
from .sinkhorn import sinkhorn, sinkhorn_plan
from .sparse import (
    TopKTeacher,
    sparse_forward_kl,
    sparse_generalized_jsd,
    sparse_reverse_kl,
    sparse_skew_kl,
    sparse_skew_reverse_kl,
    sparse_soft_cross_entropy,
    sparse_tvd,
    sparse_version,
)
from .taid import TAID
from .uld import gold, uld

__all__ = [
    "DACKL",
    "OBJECTIVES",
    "TAID",
    "TopKTeacher",
    "ObjectiveInfo",
    "embedding_cosine",
    "embedding_mse",
    "embedding_similarity_kl",
    "further_pretraining_sd",
    "first_token_kl",
    "first_token_kl_topk",
    "forward_kl",
    "fused_linear_divergence",
    "dac_kl",
    "generalized_jsd",
    "js_divergence",
    "gold",
    "get_objective",
    "flops",
    "idf_flops",
    "in_batch_margin_mse",
    "listwise_kl",
    "logit_std_js",
    "logit_std_kd",
    "margin_mse",
    "pointwise_mse",
    "reverse_kl",
    "sinkhorn",
    "sinkhorn_plan",
    "skew_kl",
    "skew_reverse_kl",
    "soft_cross_entropy",
    "span_correlation",
    "standardize_logits",
    "self_judge",
    "expected_score",
    "sparse_forward_kl",
    "sparse_generalized_jsd",
    "sparse_reverse_kl",
    "sparse_skew_kl",
    "sparse_skew_reverse_kl",
    "sparse_soft_cross_entropy",
    "sparse_tvd",
    "sparse_version",
    "tvd",
    "uld",
]
