"""Evaluation: task metrics (classification, embeddings) and speed (parameters, throughput)."""

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
from potstill.eval.speed import compare_throughput, count_parameters, measure_throughput

__all__ = [
    "accuracy",
    "classification_metrics",
    "compare_throughput",
    "count_parameters",
    "embedding_metrics",
    "linear_probe_accuracy",
    "macro_f1",
    "mean_cosine",
    "measure_throughput",
    "neighbour_recall_at_k",
    "pair_spearman",
    "similarity_spearman",
    "top1_agreement",
]
