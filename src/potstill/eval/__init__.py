"""Evaluation: task metrics (classification, embeddings, retrieval) and speed (parameters, throughput)."""

from potstill.eval.metrics import (
    accuracy,
    classification_metrics,
    embedding_metrics,
    linear_probe_accuracy,
    macro_f1,
    mean_cosine,
    neighbour_recall_at_k,
    pair_spearman,
    similarity_spearman,
    top1_agreement,
)
from potstill.eval.retrieval import (
    kendall_tau,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    relevance_matrix,
    rerank_metrics,
    retrieval_metrics,
    top_k_overlap,
)
from potstill.eval.speed import (
    Throughput,
    compare_throughput,
    compare_throughput_stats,
    count_parameters,
    measure_throughput,
)

__all__ = [
    "Throughput",
    "accuracy",
    "classification_metrics",
    "compare_throughput",
    "compare_throughput_stats",
    "count_parameters",
    "embedding_metrics",
    "kendall_tau",
    "linear_probe_accuracy",
    "macro_f1",
    "mean_cosine",
    "measure_throughput",
    "mrr_at_k",
    "ndcg_at_k",
    "neighbour_recall_at_k",
    "pair_spearman",
    "recall_at_k",
    "relevance_matrix",
    "rerank_metrics",
    "retrieval_metrics",
    "similarity_spearman",
    "top1_agreement",
    "top_k_overlap",
]
