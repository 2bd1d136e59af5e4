"""Compact ANN indexes learned from dense embeddings.

`IVFPQ` is a differentiable IVF-PQ quantiser with the semantics of FAISS's IndexIVFPQ (by_residual=True),
initialised from FAISS's own k-means (`train_faiss_ivfpq`, `IVFPQ.from_faiss`); `distill_vq` trains it by
listwise distillation of the dense scores (Distill-VQ, Xiao et al. 2022); `export_faiss` writes it into a real
`faiss.IndexIVFPQ` that needs nothing from potstill.
"""

from .distill_vq import DistillVQResult, distill_vq, exact_search, retrieval_agreement
from .ivfpq import IVFPQ, Quantized, export_faiss, train_faiss_ivfpq

__all__ = [
    "IVFPQ",
    "DistillVQResult",
    "Quantized",
    "distill_vq",
    "exact_search",
    "export_faiss",
    "retrieval_agreement",
    "train_faiss_ivfpq",
]
