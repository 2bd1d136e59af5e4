"""A static-embedding student: one vector per vocabulary token, a sentence is the mean of its tokens' vectors.

Built from the teacher without data, as model2vec does (Tulkens & van Dongen 2024, MinishLab/model2vec):

1. every token id t of the tokenizer is run through the teacher as the 3-token sequence [EOS-side special,
   t, BOS-side special] (model2vec's order: the tokenizer's closing special token first, its opening one
   last, which it reports works better), and the mean of the three output states is t's vector;
2. PCA to `pca_dims` dimensions (full SVD; all dimensions kept when `pca_dims` is None or not smaller);
3. SIF weighting with Zipf-estimated frequencies: token rank r = 1, 2, … in vocabulary order, p_r ∝ 1/(r+1)
   normalised to sum to 1, vector_r *= a / (a + p_r), a = `sif_coefficient` (1e-4; None = no weighting).

The student (`StaticStudent`) embeds a tokenised batch as the mean of its non-special tokens' vectors, and is
exported as a sentence-transformers `StaticEmbedding` model (+ `Normalize` when `normalize`), which tokenises
without special tokens: the same vectors. It can then be trained further by embedding distillation on text
(the `embedding` task with `student.init: static`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from potstill.io import atomic_dir


def _special_pair(tokenizer: Any) -> tuple[int, int]:
    """(opening, closing) special token ids the tokenizer wraps a text in ([CLS], [SEP] for BERT)."""
    ids = tokenizer("a")["input_ids"]
    if len(ids) >= 3:
        return ids[0], ids[-1]
    fallback = [t for t in (tokenizer.bos_token_id, tokenizer.cls_token_id, tokenizer.eos_token_id,
                            tokenizer.sep_token_id, tokenizer.pad_token_id) if t is not None]
    if not fallback:
        raise ValueError(f"{type(tokenizer).__name__} adds no special tokens and has none to wrap a token in")
    return fallback[0], fallback[-1]


@torch.no_grad()
def token_vectors(teacher: nn.Module, tokenizer: Any, *, batch_size: int = 1024, progress: Any = None) -> Tensor:
    """`[V, D]` float32: for every token id, the mean output state of the teacher on [close, id, open]."""
    opening, closing = _special_pair(tokenizer)
    vocab = len(tokenizer)
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    out = []
    for start in range(0, vocab, batch_size):
        ids = torch.arange(start, min(start + batch_size, vocab))
        seq = torch.stack([torch.full_like(ids, closing), ids, torch.full_like(ids, opening)], 1).to(device)
        inputs = {"input_ids": seq, "attention_mask": torch.ones_like(seq)}
        if "token_type_ids" in tokenizer.model_input_names:
            inputs["token_type_ids"] = torch.zeros_like(seq)
        hidden = teacher(**inputs).last_hidden_state
        out.append(hidden.float().mean(1).cpu())
        if progress is not None:
            progress(len(ids))
    teacher.train(was_training)
    return torch.cat(out)


def pca(vectors: Tensor, dims: int | None) -> Tensor:
    """Rows of `vectors` centred and projected on their first `dims` principal components (full SVD)."""
    x = vectors.double()
    x = x - x.mean(0, keepdim=True)
    keep = x.shape[1] if dims is None else min(dims, x.shape[1], x.shape[0])
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return (x @ vh[:keep].T).float()


def sif_weights(n: int, coefficient: float) -> Tensor:
    """a / (a + p_r) for ranks r = 1 … n, p_r ∝ 1/(r + 1) (Zipf's law) normalised to sum to 1."""
    inv_rank = 1.0 / torch.arange(2, n + 2, dtype=torch.float64)
    proba = inv_rank / inv_rank.sum()
    return (coefficient / (coefficient + proba)).float()


def static_vectors(teacher: nn.Module, tokenizer: Any, *, pca_dims: int | None = 256,
                   sif_coefficient: float | None = 1e-4, progress: Any = None) -> Tensor:
    """The data-free static embedding matrix `[V, d]` (steps 1–3 of the module docstring)."""
    if sif_coefficient is not None and not 0 < sif_coefficient < 1:
        raise ValueError(f"sif_coefficient must be in (0, 1) or null, got {sif_coefficient!r}")
    if pca_dims is not None and (isinstance(pca_dims, bool) or not isinstance(pca_dims, int) or pca_dims < 1):
        raise ValueError(f"pca_dims must be a positive int or null, got {pca_dims!r}")
    vectors = pca(token_vectors(teacher, tokenizer, progress=progress), pca_dims)
    if sif_coefficient is not None:
        vectors = vectors * sif_weights(vectors.shape[0], sif_coefficient)[:, None]
    return vectors


class StaticStudent(nn.Module):
    """Sentence vector = mean of the vectors of its real, non-special tokens (`forward`)."""

    def __init__(self, vectors: Tensor, special_ids: list[int], *, normalize: bool = False) -> None:
        super().__init__()
        self.embedding = nn.Embedding.from_pretrained(vectors.float().clone(), freeze=False)
        self.register_buffer("special", torch.tensor(sorted(set(special_ids)), dtype=torch.long), persistent=False)
        self.normalize = normalize

    @classmethod
    def from_teacher(cls, teacher: nn.Module, tokenizer: Any, *, pca_dims: int | None = 256,
                     sif_coefficient: float | None = 1e-4, normalize: bool = True,
                     progress: Any = None) -> StaticStudent:
        vectors = static_vectors(teacher, tokenizer, pca_dims=pca_dims, sif_coefficient=sif_coefficient,
                                 progress=progress)
        return cls(vectors, list(tokenizer.all_special_ids), normalize=normalize)

    @property
    def dim(self) -> int:
        return self.embedding.embedding_dim

    def model_shape(self) -> Any:
        from potstill.losses.intermediate import ModelShape

        return ModelShape(layers=0, hidden=self.dim, heads=1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """`[B, d]` sentence vectors: the mean of the vectors of the real, non-special tokens."""
        keep = attention_mask.bool() & ~torch.isin(input_ids, self.special.to(input_ids.device))
        vectors = self.embedding(input_ids) * keep.unsqueeze(-1)
        out = vectors.sum(1) / keep.sum(1, keepdim=True).clamp_min(1)
        return nn.functional.normalize(out, dim=-1) if self.normalize else out

    def save_sentence_transformer(self, tokenizer: Any, path: str | os.PathLike, *,
                                  max_tokens: int | None = None) -> Path:
        """A sentence-transformers folder (StaticEmbedding (+ Normalize)), written atomically. `max_tokens`
        truncates texts to the number of tokens the student saw in training (None: no limit)."""
        import copy

        from sentence_transformers import SentenceTransformer

        try:
            from sentence_transformers.sentence_transformer.modules import Normalize, StaticEmbedding
        except ImportError:  # older releases
            from sentence_transformers.models import Normalize, StaticEmbedding

        weights = self.embedding.weight.detach().float().cpu().clone()
        backend = copy.deepcopy(getattr(tokenizer, "backend_tokenizer", tokenizer))  # StaticEmbedding edits it
        backend.no_truncation()
        if max_tokens is not None:
            backend.enable_truncation(max_tokens)
        modules = [StaticEmbedding(backend, embedding_weights=weights)]
        if self.normalize:
            modules.append(Normalize())
        model = SentenceTransformer(modules=modules, device="cpu")
        path = Path(path)
        with atomic_dir(path) as tmp:
            model.save(str(tmp), create_model_card=False)
        return path
